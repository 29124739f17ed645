"""DDP on 2 CPU processes (gloo) computes what 1 process computes with the same global batch."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from finetune.data import ImageFolderDataModule
from finetune.tasks import ClassificationTask


class FixedBatchNormTask(ClassificationTask):
    """BatchNorm in eval mode: per-rank batch statistics (no SyncBN on CPU) would otherwise
    make 2x8 differ from 1x16 by design, hiding what this test checks."""

    def on_train_epoch_start(self):
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


class UnaugmentedData(ImageFolderDataModule):
    """Random crops would differ between the runs; the shuffle order does not (see _train_sampler)."""

    def train_transform(self):
        return self.eval_transform()


def fit(colour_folder, devices: int, batch_size: int, root):
    L.seed_everything(0)
    dm = UnaugmentedData(str(colour_folder), backbone="resnet18", image_size=32, batch_size=batch_size, num_workers=0)
    task = FixedBatchNormTask(
        num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False,
        # SGD keeps float-rounding differences proportional to the gradients; Adam divides
        # near-zero gradients by their own size and would amplify them.
        optimizer="sgd", lr=0.02,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(task, dm)
    return {k: v.item() for k, v in trainer.callback_metrics.items()}, task.state_dict()


def test_two_ranks_match_one_process(colour_folder, tmp_path):
    single_metrics, single_weights = fit(colour_folder, devices=1, batch_size=16, root=tmp_path / "one")
    ddp_metrics, ddp_weights = fit(colour_folder, devices=2, batch_size=8, root=tmp_path / "two")
    assert single_metrics["val/acc"] > 0.5  # it learned something (chance 0.33)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("val/acc", "val/f1", "val/loss", "train/loss_epoch"):
        assert abs(ddp_metrics[key] - single_metrics[key]) < 1e-4, (key, ddp_metrics[key], single_metrics[key])
