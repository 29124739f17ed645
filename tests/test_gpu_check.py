"""benchmarks/gpu_check.py --dry-run: the GPU check's code path on the CPU, in-process (a new
process would cost ~10 s of imports). Ratios are printed but not judged there; host syncs,
predictions and export parity are."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

TASKS = ("classification", "segmentation", "embedding")


def test_dry_run_passes_and_prints_every_section(tmp_path, capsys):
    figures = tmp_path / "figures.json"
    status = gpu_check.main(["--dry-run", "--json", str(figures), "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert status == 0, out
    for task in TASKS:
        assert re.search(rf"^{task} host syncs \(eager\): 0 in [1-9]\d* steady-state non-logging .*PASS$", out, re.M)
        assert re.search(rf"^{task} host syncs \(compiled\): 0 in [1-9].*, [1-9]\d* graphs compiled PASS$", out, re.M)
        assert re.search(rf"^{task} predict \(cpu, checkpoint\): .* PASS$", out, re.M)
        for engine in ("onnxruntime", "torchscript"):
            assert re.search(rf"^{task} export \w+: parity \({engine} vs PyTorch\) .* PASS$", out, re.M)
    assert "classification host syncs (eager, data on the device): 0 in" in out
    ratio = r"^(\w+) fit/raw \((on-device data|JPEG files)\): \d+\.\d\d \(target >= (0\.\d\d)\) (.*)$"
    ratios = re.findall(ratio, out, re.M)
    assert [(task, data, target) for task, data, target, _ in ratios] == [
        ("classification", "on-device data", "0.95"), ("classification", "JPEG files", "0.90"),
        ("segmentation", "JPEG files", "0.90"), ("embedding", "JPEG files", "0.90"),
    ]
    assert all(verdict.startswith("not judged (dry run") for *_, verdict in ratios)
    figures = json.loads(figures.read_text())
    assert figures["dry_run"] and not figures["failed"] and set(figures["tasks"]) == set(TASKS)
    assert figures["tasks"]["classification"]["images_per_s"]["raw loop"] > 0
    # the dry run's toy backbones are gone afterwards: other tests build the real ones
    assert all(module.create_backbone is gpu_check.create_backbone for module in gpu_check.NETWORK_MODULES)


def test_without_cuda_it_stops_at_once_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here; says so on a GPU machine too
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err == "gpu_check: no CUDA device; run with --dry-run to check the script on CPU\n"


def test_help_says_ratio_misses_are_not_fatal(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    assert "reported, NOT fatal" in capsys.readouterr().out
