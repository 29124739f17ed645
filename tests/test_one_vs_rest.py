"""A fourth task (tests/one_vs_rest.py + tests/one_vs_rest.yaml) trains through the CLI, exports
to ONNX and predicts, from the checkpoint and from the exported file, through the shared code:
what the README's layout section promises a new task gets from one module, config and test."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from finetune.cli import create_cli
from finetune.export.command import main as export
from finetune.export.metadata import read_metadata
from finetune.predict_exported import main as predict_exported

CONFIG = str(Path(__file__).with_name("one_vs_rest.yaml"))


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_a_new_task_trains_exports_and_predicts_through_the_shared_code(colour_folder, tmp_path, capsys):
    run = tmp_path / "run"
    cli = create_cli(["fit", "--config", CONFIG, "--data.root", str(colour_folder), "--trainer.default_root_dir", str(run)])
    checkpoint = cli.trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode) == ("val/loss", "min")  # the task's contract, not val/acc
    assert cli.trainer.callback_metrics["val/acc"] > 0.6  # chance: 0.33
    assert cli.model.hparams.preprocessing["input_size"] == [3, 32, 32]  # linked from the data

    onnx = tmp_path / "ovr.onnx"
    export(["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output", str(onnx), "--parity_images", "4"])
    printed = capsys.readouterr().out
    assert "exported one_vs_rest" in printed and "parity (onnxruntime vs PyTorch)" in printed and "FAILED" not in printed
    meta = read_metadata(onnx)
    assert (meta["task"], meta["writer"], list(meta["outputs"])) == ("one_vs_rest", "csv", ["logits", "probabilities"])
    assert meta["class_names"] == ["blue", "green", "red"] and meta["input_size"] == [3, 32, 32]

    predict_exported(["--exported", str(onnx), "--input", str(colour_folder / "val"), "--output", str(tmp_path / "onnx")])
    create_cli(["predict", "--config", CONFIG, "--data.root", str(colour_folder), "--trainer.default_root_dir", str(run),
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.predict_root", str(colour_folder / "val"),
                "--predictions.output_dir", str(tmp_path / "ckpt")])
    exported, lightning = rows(tmp_path / "onnx" / "predictions.csv"), rows(tmp_path / "ckpt" / "predictions.csv")
    assert len(exported) == len(lightning) == 24
    for ours, theirs in zip(exported, lightning):
        assert (ours["path"], ours["prediction"]) == (theirs["path"], theirs["prediction"])
        assert abs(float(ours["probability"]) - float(theirs["probability"])) <= 1e-4
    # Sigmoids, one per class: the top-3 probabilities need not add up to 1 as a softmax's would.
    sums = [sum(float(item.split(":")[1]) for item in row["top5"].split(";")) for row in exported]
    assert not np.allclose(sums, 1.0, atol=1e-3)
