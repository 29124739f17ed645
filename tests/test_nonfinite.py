"""A NaN/inf loss stops training with a message naming the step and the cause; no checkpoint with
NaN weights replaces the last good one; the guard reads its device-side flag only every N steps."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from finetune.callbacks.nonfinite import (
    NonFiniteGuard,
    NonFiniteLossError,
    check_before_saving,
)
from finetune.cli import create_cli
from finetune.commands import main

REPO = Path(__file__).resolve().parents[1]


def run_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(data),
        "--data.image_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
        "--model.pretrained", "false", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run), *extra,
    ]


class PoisonBatch(Callback):
    """NaN in one pixel of the batch of step `at_step` + 1: what a corrupt input does."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            batch["image"][3, 0, 0, 0] = float("nan")


def test_poisoned_batch_stops_training_and_keeps_the_last_good_checkpoint(colour_folder, tmp_path):
    run = tmp_path / "run"
    cli = create_cli([*run_args(colour_folder, run), "--trainer.max_epochs", "2"], run=False)
    cli.trainer.callbacks.append(PoisonBatch(at_step=8))  # epoch 1 (6 steps per epoch), batch 2
    with pytest.raises(NonFiniteLossError) as stopped:
        cli.trainer.fit(cli.model, cli.datamodule)
    last = run / "checkpoints" / "last.ckpt"
    message = str(stopped.value)
    assert message.startswith("train/loss is nan at step 9 (epoch 1, batch 2); training stopped, and the last good ")
    assert f"checkpoint is kept ({last})" in message and "Cause: NaN/inf in that input batch (image of " in message
    for path in run.glob("checkpoints/*.ckpt"):  # last.ckpt and best-*.ckpt: from epoch 0, finite
        saved = torch.load(path, weights_only=True)
        assert saved["global_step"] == 6, path.name
        assert all(torch.isfinite(t).all() for t in saved["state_dict"].values()), path.name
    assert cli.trainer.global_step == 9  # stopped at once, not at the end of the epoch


def test_huge_learning_rate_is_one_line_naming_the_step_and_the_lr(colour_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = ["finetune", "fit", *run_args(colour_folder, run, "--trainer.max_epochs", "1", "--model.lr", "1e10")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("error: train/loss is nan at step ")
    assert "training stopped (no checkpoint had been saved yet)" in message
    assert "Likely cause: the learning rate is too high (model.lr 1e+10;" in message
    assert not list(run.glob("checkpoints/*.ckpt"))


def fake_trainer(step: int, logging_step: bool = False) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, current_epoch=0, world_size=1, precision="32-true",
                           checkpoint_callback=None, state=SimpleNamespace(fn="fit"),
                           _logger_connector=SimpleNamespace(should_update_logs=logging_step))


def test_guard_reads_the_device_flag_only_every_n_steps(monkeypatch):
    guard = NonFiniteGuard(check_every_n_steps=4)
    guard.cpu_checks_every_step = False  # behave as on a GPU
    module = torch.nn.Linear(1, 1)
    syncs = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: syncs.append(1) or real_item(self))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host sync in a training step"))
    losses = [0.7, float("nan"), 0.6]  # the bad step is the second
    for step, loss in enumerate(losses, start=1):
        guard.on_train_batch_end(fake_trainer(step), module, {"loss": torch.tensor(loss)}, None, step - 1)
    assert syncs == []
    with pytest.raises(NonFiniteLossError, match=r"^train/loss is nan at step 2 \(epoch 0, batch 1\)"):
        guard.on_train_batch_end(fake_trainer(4), module, {"loss": torch.tensor(0.5)}, None, 3)



def test_guard_reads_the_flag_on_logging_steps(monkeypatch):
    """The steps the loggers write wait for the GPU anyway: the guard checks there too, so with
    the defaults (both 50) it adds no stall of its own."""
    guard = NonFiniteGuard(check_every_n_steps=50)
    guard.cpu_checks_every_step = False
    module = torch.nn.Linear(1, 1)
    guard.on_train_batch_end(fake_trainer(1), module, {"loss": torch.tensor(float("inf"))}, None, 0)
    with pytest.raises(NonFiniteLossError, match=r"^train/loss is inf at step 1 \(epoch 0, batch 0\)"):
        guard.on_train_batch_end(fake_trainer(2, logging_step=True), module, {"loss": torch.tensor(0.5)}, None, 1)


def test_no_checkpoint_is_written_with_nan_weights():
    module = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(**vars(fake_trainer(5)), lightning_module=module, callbacks=[])
    check_before_saving(trainer)  # finite: fine
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"^weights became non-finite \(weight\) by step 5"):
        check_before_saving(trainer)
