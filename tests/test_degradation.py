"""The degradation experiment: the nets are the paper's, the data loads with or without Debian's
Fashion-MNIST, a short run writes its results, and the committed figures back the notebook."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

from experiments import degradation as deg  # the repository root is on pytest's pythonpath

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "notebooks" / "figures"


@pytest.mark.parametrize("depth", [20, 56])
def test_depth_counts_weighted_layers_and_shortcuts_add_no_parameters(depth):
    plain, residual = deg.CifarNet(depth, False), deg.CifarNet(depth, True)
    weighted = [m for m in plain.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(weighted) == depth
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in residual.parameters())
    assert residual(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert residual.name == f"resnet-{depth}" and plain.name == f"plain-{depth}"


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        deg.CifarNet(21, True)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_with_a_silent_branch_is_the_option_a_shortcut(stride):
    block = deg.Block(16, 16 * stride, stride, residual=True).eval()
    nn.init.zeros_(block.bn2.weight)  # F(x) = 0: only the shortcut is left
    x = torch.rand(2, 16, 8, 8)  # non-negative, as after a ReLU
    expected = x[:, :, ::stride, ::stride]
    expected = torch.cat([expected, torch.zeros_like(expected)[:, : 16 * stride - 16]], dim=1)
    torch.testing.assert_close(block(x), expected)
    plain = deg.Block(16, 16 * stride, stride, residual=False).eval()
    nn.init.zeros_(plain.bn2.weight)
    assert plain(x).abs().max() == 0  # without the shortcut nothing gets through


def test_reads_idx_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", *images.shape) + images.tobytes())
    np.testing.assert_array_equal(deg.read_idx(path), images)


def test_falls_back_to_the_sample_without_debians_files(monkeypatch, tmp_path):
    monkeypatch.setattr(deg, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    splits, source = deg.load_fashion_mnist("auto")
    assert source.endswith("fashion-mnist-sample")
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    assert train_x.shape == (1000, 28, 28) and test_x.shape == (200, 28, 28)
    assert np.bincount(train_y).tolist() == [100] * 10 and np.bincount(test_y).tolist() == [20] * 10
    x, y = deg.to_tensors(train_x, train_y, 16, 100, seed=0)
    assert x.shape == (100, 1, 16, 16) and len(set(y.tolist())) > 5  # a shuffled subset, not one class


def test_short_run_learns_and_writes_every_result(tmp_path):
    out = tmp_path / "deg"
    deg.main(["--depths", "8", "--epochs", "4", "--train-size", "400", "--test-size", "100", "--data", "sample",
              "--lr", "0.1", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    curves = deg.read_csv(out / "degradation.csv")
    assert [(r["model"], r["epoch"]) for r in curves] == [(m, e) for m in ("plain-8", "resnet-8") for e in (1, 2, 3, 4)]
    for model in ("plain-8", "resnet-8"):
        errors = [r["train_error"] for r in curves if r["model"] == model]
        assert errors[-1] < min(0.7, errors[0] - 0.15), (model, errors)  # learning, well below chance (0.9)
    gradients = deg.read_csv(out / "gradients.csv")
    assert {(g["model"], g["when"]) for g in gradients} == {(m, w) for m in ("plain-8", "resnet-8") for w in ("init", "trained")}
    lesion = deg.read_csv(out / "lesion.csv")
    # n = 1: the only removable block is the first (stages 2 and 3 open with a shape change).
    assert {r["block"] for r in lesion} == {"none", "layer1.0"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["train_size"] == 400 and settings["data"].endswith("fashion-mnist-sample")
    assert (out / "degradation.png").stat().st_size > 10_000


def test_lesion_deletes_each_shape_preserving_block_once_and_restores_the_net():
    torch.manual_seed(0)
    net = deg.CifarNet(14, True).eval()
    x, y = torch.randn(20, 1, 16, 16), torch.randint(0, 10, (20,))
    before = net(x)
    errors = deg.lesion_errors(net, x, y)
    assert list(errors) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1"]
    torch.testing.assert_close(net(x), before)


@pytest.mark.parametrize("folder", ["degradation", "degradation_lr0.1"])
def test_committed_full_runs_back_the_notebook(folder):
    """notebooks/figures/<folder> is a full run of all four nets on one thread, and the training
    errors the notebook's text states for it are the CSV's, not typed in."""
    curves = deg.read_csv(FIGURES / folder / "degradation.csv")
    last = max(r["epoch"] for r in curves)
    final = {r["model"]: r for r in curves if r["epoch"] == last}
    assert sorted(final) == ["plain-20", "plain-56", "resnet-20", "resnet-56"]
    settings = json.loads((FIGURES / folder / "settings.json").read_text())
    assert settings["epochs"] == last and settings["threads"] == 1
    notebook = nbformat.read(REPO / "notebooks" / "04_residual_learning.ipynb", as_version=4)
    text = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    table = re.search(
        rf"Training error at epoch {last}, `figures/{re.escape(folder)}`.*\n\n\| depth \| plain \| residual \|\n\|---\|---\|---\|\n"
        r"\| 20 \| ([\d.]+) % \| ([\d.]+) % \|\n\| 56 \| ([\d.]+) % \| ([\d.]+) % \|",
        text,
    )
    assert table, f"the notebook states the four training errors of figures/{folder} in a table"
    stated = [float(v) for v in table.groups()]
    measured = [100 * final[m]["train_error"] for m in ("plain-20", "resnet-20", "plain-56", "resnet-56")]
    assert stated == pytest.approx(measured, abs=0.051)
