"""Weight files and checkpoints are read with weights_only=True: a pickle whose payload would run
code is refused with one line naming the file, and the payload never runs."""

from __future__ import annotations

import builtins
import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from finetune.commands import main
from finetune.weights import plain_hyperparameters

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if the pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def malicious_checkpoint(tmp_path, marker) -> Path:
    """Looks like a Lightning checkpoint; one value is the payload."""
    path = tmp_path / "downloaded.ckpt"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "hyper_parameters": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # proof that the payload is live when pickle is trusted
    assert marker.exists()
    marker.unlink()
    return path


@pytest.fixture
def malicious_legacy_pickle(tmp_path, marker) -> Path:
    """A plain pickle (torch's legacy format), as `.pth` files from the web often are."""
    path = tmp_path / "resnet18_weights.pth"
    with path.open("wb") as f:
        pickle.dump({"conv1.weight": Payload(marker)}, f, protocol=2)  # what torch.save used
    return path


def run_main(monkeypatch, data: Path, run: Path, subcommand: str, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", [
        "finetune", subcommand, "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(data),
        "--data.image_size", "32", "--data.num_workers", "0", "--model.pretrained", "false",
        "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run), *argv,
    ])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert isinstance(exit_.value.code, str) and "\n" not in exit_.value.code, exit_.value.code
    return exit_.value.code


@pytest.mark.parametrize("how", [
    "fit --model.weights", "fit --model.weights (legacy pickle)", "fit --ckpt_path", "validate --ckpt_path",
    "fit --ckpt_path last",
])
def test_malicious_pickle_is_refused_naming_the_file_and_never_runs(
    how, malicious_checkpoint, malicious_legacy_pickle, marker, colour_folder, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    path = malicious_legacy_pickle if "legacy" in how else malicious_checkpoint
    subcommand, key = how.split()[:2]
    value = str(path)
    if how.endswith("last"):  # someone replaced the run's own last.ckpt
        (run / "checkpoints").mkdir(parents=True)
        path = run / "checkpoints" / "last.ckpt"
        path.write_bytes(malicious_checkpoint.read_bytes())
        value = "last"
    message = run_main(monkeypatch, colour_folder, run, subcommand, key, value)
    name = key.removeprefix("--")
    assert message.startswith(f"error: {name}: {path} holds pickled Python objects (io.open)"), message
    assert "refused (weights_only=True) and nothing in it ran" in message
    assert not marker.exists(), "the pickled payload ran"


def test_truncated_checkpoint_is_named(malicious_checkpoint, colour_folder, tmp_path, monkeypatch):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(malicious_checkpoint.read_bytes()[:200])
    message = run_main(monkeypatch, colour_folder, tmp_path / "run", "validate", "--ckpt_path", str(truncated))
    assert message.startswith(f"error: ckpt_path: {truncated} is not a readable PyTorch file"), message


def test_hyperparameters_are_stored_as_plain_values():
    """Our checkpoints stay loadable with weights_only=True even if a path or numpy value sneaks in."""
    checkpoint = {
        "hyper_parameters": {"weights": Path("/w/r50.pth"), "lr": np.float32(0.5), "mean": np.array([0.5, 0.4]),
                             "scale": (0.25, 1.0), "finetuning": {"unfreeze_at": [np.int64(1)]},
                             "fn": TrainerFn.FITTING},
        "datamodule_hyper_parameters": {"root": Path("/data")},
    }
    plain_hyperparameters(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["hyper_parameters"] == {
        "weights": "/w/r50.pth", "lr": 0.5, "mean": [0.5, pytest.approx(0.4)], "scale": (0.25, 1.0),
        "finetuning": {"unfreeze_at": [1]}, "fn": "fit",
    }
    assert loaded["datamodule_hyper_parameters"] == {"root": "/data"}
