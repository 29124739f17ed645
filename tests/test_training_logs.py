"""What a run logs during training: batch-weighted means of the step losses, on the logging steps
only (a `self.log` call costs more than a small step; see benchmarks/overhead.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger

from finetune.data.classification import ImageFolderDataModule
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.running_means import RunningMeans


class RecordingLogger(Logger):
    name, version = "recording", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def values(self, key: str) -> list[float]:
        return [metrics[key] for _, metrics in self.rows if key in metrics]


class StepLosses(Callback):
    def __init__(self):
        self.epochs: list[list[tuple[float, int]]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[-1].append((float(outputs["loss"]), len(batch["label"])))


def weighted_mean(pairs) -> float:
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


def test_step_and_epoch_losses_are_batch_weighted_means_logged_on_logging_steps_only(colour_folder, tmp_path):
    L.seed_everything(0)
    # 48 training images, 3 batches an epoch (uneven batch sizes: the RunningMeans test below).
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=24, batch_size=16, num_workers=0)
    task = ClassificationTask(num_classes=dm.num_classes, backbone="resnet18", pretrained=False, lr=3e-3)
    calls: list[str] = []
    log = task.log
    task.log = lambda name, *args, **kwargs: (calls.append(name), log(name, *args, **kwargs))[1]
    logger, losses = RecordingLogger(), StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_val_batches=0, log_every_n_steps=2, logger=logger,
        callbacks=[losses], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, dm)

    first, second = losses.epochs
    assert [n for _, n in first] == [16, 16, 16]
    # Logged on the 2nd, 4th and 6th optimizer step, each the mean since the last logged step
    # within the epoch (an epoch starts a new interval).
    expected_steps = [weighted_mean(first[:2]), weighted_mean(second[:1]), weighted_mean(second[1:])]
    assert logger.values("train/loss_step") == pytest.approx(expected_steps, rel=1e-5)
    expected_epochs = [weighted_mean(first), weighted_mean(second)]
    assert logger.values("train/loss_epoch") == pytest.approx(expected_epochs, rel=1e-5)
    assert trainer.callback_metrics["train/loss_epoch"] == pytest.approx(expected_epochs[-1], rel=1e-5)
    assert 0.0 <= trainer.callback_metrics["train/acc_epoch"] <= 1.0
    # No self.log per step: the loss and accuracy are logged on 3 of the 6 steps and at 2 epoch ends.
    assert calls.count("train/loss_step") == 3 and calls.count("train/acc_step") == 3
    assert calls.count("train/loss_epoch") == 2


def test_running_means_weight_by_batch_size_and_restart_the_interval():
    means = RunningMeans(["loss", "acc"])
    assert means.interval_means() == {} and means.epoch_means() == {}
    means.add(3, [torch.tensor(1.0), torch.tensor(0.0)])
    means.add(1, [torch.tensor(5.0), torch.tensor(1.0)])
    interval = means.interval_means()
    assert float(interval["loss"]) == pytest.approx(2.0) and float(interval["acc"]) == pytest.approx(0.25)
    means.add(4, [torch.tensor(0.5), torch.tensor(1.0)])
    assert float(means.interval_means()["loss"]) == pytest.approx(0.5)
    epoch = means.epoch_means(reduce=lambda totals: totals * 2)  # as if two ranks had the same sums
    assert float(epoch["loss"]) == pytest.approx((3 + 5 + 2) / 8) and float(epoch["acc"]) == pytest.approx(5 / 8)
