"""The CLI end to end, in-process (each new process costs ~10 s of imports) except one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from finetune.cli import create_cli

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
OVERLAYS = {"classify_resnext.yaml": "classify.yaml"}  # configs meant to stack on another


def small_run(data: Path, run: Path, *extra: str) -> list[str]:
    """Quickstart, shrunk to seconds: 32 px images, no workers, no progress bar."""
    return [
        "--config", QUICKSTART,
        "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
        *extra,
    ]


def test_fit_writes_offline_wandb_run_then_predict_writes_csv(colour_folder, tmp_path, capsys):
    run = tmp_path / "run"
    cli = create_cli(["fit", *small_run(colour_folder, run, "--trainer.max_epochs", "4", "--model.lr", "0.003")])
    assert "final validation: " in capsys.readouterr().out
    assert cli.trainer.callback_metrics["val/acc"] >= 0.9
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))
    media = offline_runs[0] / "files" / "media"
    assert list((media / "images").rglob("*.png")), "prediction grid was not logged"
    assert list((media / "table").rglob("*.json")), "confusion matrix was not logged"
    assert not list((tmp_path / "home").rglob("*wandb*")), "W&B wrote into the home folder"
    best = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best).parent == run / "checkpoints" and (run / "checkpoints" / "last.ckpt").is_file()

    out = tmp_path / "predictions.csv"
    create_cli([
        "predict", *small_run(colour_folder, run), "--trainer.logger", "false", "--ckpt_path", best,
        "--data.predict_root", str(colour_folder / "val"), "--predictions.output_dir", str(tmp_path),
    ])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and list(rows[0]) == ["path", "prediction", "probability", "top5"]
    correct = sum(Path(r["path"]).parent.name == r["prediction"] for r in rows)
    assert correct >= 20
    top = rows[0]["top5"].split(";")
    assert len(top) == 3 and top[0].split(":")[0] == rows[0]["prediction"]
    assert abs(sum(float(t.split(":")[1]) for t in top) - 1) < 1e-3


class RecordResume(Callback):
    def __init__(self):
        self.batches = 0
        self.start_weights = None

    def on_train_start(self, trainer, pl_module):
        self.start_weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.start_epoch = trainer.current_epoch

    def on_train_batch_end(self, *args):
        self.batches += 1


def test_resume_from_last_continues_where_it_stopped(colour_folder, tmp_path):
    run = tmp_path / "run"
    base = small_run(colour_folder, run, "--trainer.logger", "false")
    create_cli(["fit", *base, "--trainer.max_epochs", "2"])
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)

    cli = create_cli([*base, "--trainer.max_epochs", "3"], run=False)
    recorder = RecordResume()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    assert recorder.start_epoch == 2 and recorder.batches == 3  # one more epoch, not three
    for name, tensor in saved["state_dict"].items():
        torch.testing.assert_close(recorder.start_weights[name], tensor, msg=name)
    adam_steps = {int(s["step"]) for s in cli.trainer.optimizers[0].state_dict()["state"].values()}
    assert adam_steps == {9}  # optimizer state was restored, not restarted


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates(config, colour_folder, shapes_folder, identity_folder, tmp_path):
    args = ["--config", str(config)]
    if config.name in OVERLAYS:
        args = ["--config", str(REPO / "configs" / OVERLAYS[config.name]), *args]
    task = config.name.split("_")[0].removesuffix(".yaml")
    data = {"segment": [shapes_folder], "faces": [identity_folder, "--data.pairs_file", "null"]}.get(task, [colour_folder])
    # The multi-label config reads the committed sample's manifest (its paths are relative to it).
    root = [] if task == "multilabel" else ["--data.root", *map(str, data)]
    cli = create_cli(
        [*args, *root, "--model.pretrained", "false",
         "--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )
    fashion = sorted(["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"])
    expected = {"segment": ["background", "red", "blue"], "faces": [f"id{i:02d}" for i in range(40)], "multilabel": fashion}
    assert cli.model.class_names == expected.get(task, ["blue", "green", "red"])
    assert cli.model.hparams.num_classes == len(cli.model.class_names)
    assert cli.datamodule.hparams.backbone == cli.model.hparams.backbone


def test_console_script_runs_fast_dev_run(colour_folder, tmp_path):
    """The installed `finetune` command itself, once, in a fresh process."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [Path(sys.executable).parent / "finetune", "fit", *small_run(colour_folder, tmp_path / "run"),
         "--model.backbone", "resnext50_32x4d", "--trainer.fast_dev_run", "true"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation: val/acc" in result.stdout


def test_bad_backbone_name_is_one_line_with_suggestions(colour_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'resnet5'; close matches: .*resnet50"):
        create_cli([*small_run(colour_folder, tmp_path), "--model.backbone", "resnet5"], run=False)


@pytest.mark.parametrize(
    "finetuning, trainable_at_end",
    [({"strategy": "none"}, 4), ({"strategy": "frozen"}, 0),
     ({"strategy": "freeze_then_unfreeze", "unfreeze_at": [1]}, 4),
     ({"strategy": "gradual", "unfreeze_at": [1, 1, 2, 2], "lr_decay": 0.5}, 2)],
    ids=lambda v: v["strategy"] if isinstance(v, dict) else str(v),
)
def test_every_strategy_runs_through_the_cli(finetuning, trainable_at_end, colour_folder, tmp_path):
    cli = create_cli([
        "fit", *small_run(colour_folder, tmp_path, "--trainer.logger", "false"), "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--model.finetuning", json.dumps(finetuning),
    ])
    assert cli.model.trainable_stages == trainable_at_end
    assert cli.model.hparams.finetuning == finetuning  # stored as plain values in the checkpoint


def test_lr_find_prints_and_plots_a_suggestion_without_training(colour_folder, tmp_path, monkeypatch, capsys):
    from finetune.commands import main

    run = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["finetune", "lr-find", *small_run(colour_folder, run, "--trainer.logger", "false", "--lr_find_steps", "30")]
    )
    main()
    out = capsys.readouterr().out
    assert "suggested learning rate: " in out or "no learning rate suggested" in out
    assert "| marks the suggestion" in out
    rows = (run / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss" and len(rows) > 10
    assert not (run / "checkpoints" / "last.ckpt").exists()  # it did not go on to train


def test_segmentation_fit_then_predict_writes_masks(shapes_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "--config", str(REPO / "configs" / "segment_quickstart.yaml"), "--data.root", str(shapes_folder),
        "--data.crop_size", "48", "--data.num_workers", "0", "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--model.pretrained", "false",
    ]
    cli = create_cli(["fit", *common, "--trainer.max_epochs", "2"])
    assert "val/miou" in capsys.readouterr().out
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    assert list(media.rglob("*.mask.png")), "mask overlays were not logged"
    assert list((media / "table").rglob("iou_per_class*.json")), "per-class IoU table was not logged"
    create_cli([
        "predict", *common, "--trainer.logger", "false", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path,
        "--data.predict_root", str(shapes_folder / "val" / "images"),
    ])
    masks = sorted((run / "predictions" / "masks").glob("*.png"))
    assert len(masks) == 8 and len(list((run / "predictions" / "overlays").glob("*.png"))) == 8
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 1, 2}
    assert not (run / "predictions.csv").exists()


@pytest.mark.parametrize("config, extra, expected", [
    ("quickstart.yaml", [], ("val/acc", "max")),  # sets neither: both from ClassificationTask's contract
    ("segment_quickstart.yaml", ["--checkpoint.monitor", "null"], ("val/miou", "max")),
    ("quickstart.yaml", ["--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min"], ("val/loss", "min")),
], ids=["classification", "segmentation", "set_in_config"])
def test_checkpoint_monitors_the_tasks_metric_unless_the_config_says(
    config, extra, expected, colour_folder, shapes_folder, tmp_path
):
    data = shapes_folder if config.startswith("segment") else colour_folder
    cli = create_cli(
        ["--config", str(REPO / "configs" / config), "--data.root", str(data), "--model.pretrained", "false",
         "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), *extra],
        run=False,
    )
    checkpoint = cli.trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode) == expected
