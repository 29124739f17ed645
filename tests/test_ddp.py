"""DDP on 2 CPU processes (gloo) computes what 1 process computes with the same global batch,
also across unfreeze points, where DDP alone would leave late-unfrozen stages unsynchronised."""

from __future__ import annotations

import json

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn

from finetune.data import ImageFolderDataModule
from finetune.tasks import ClassificationTask


class FixedBatchNormTask(ClassificationTask):
    """BatchNorm statistics fixed: per-rank batch statistics (no SyncBN on CPU) would
    otherwise make 2x8 differ from 1x16 by design, hiding what this test checks."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


class RecordTrainable(Callback):
    """Each rank writes, per step, which parameters required grad."""

    def __init__(self, folder):
        self.folder = folder
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([n for n, p in pl_module.named_parameters() if p.requires_grad])

    def on_train_end(self, trainer, pl_module):
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))


def fit(colour_folder, devices: int, batch_size: int, root):
    L.seed_everything(0)
    root.mkdir(parents=True)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=batch_size, num_workers=0)
    task = FixedBatchNormTask(
        num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False,
        # SGD keeps float-rounding differences proportional to the gradients; Adam divides
        # near-zero gradients by their own size and would amplify them.
        optimizer="sgd", lr=0.02,
        finetuning={"strategy": "gradual", "unfreeze_at": [1, 2, 3, 4], "lr_decay": 0.5},
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=[RecordTrainable(root)],
    )
    trainer.fit(task, dm)
    trainable = [json.loads(p.read_text()) for p in sorted(root.glob("rank*.json"))]
    return {k: v.item() for k, v in trainer.callback_metrics.items()}, task.state_dict(), trainable


def test_two_ranks_match_one_process_across_unfreezing(colour_folder, tmp_path):
    single_metrics, single_weights, (single_trainable,) = fit(colour_folder, 1, 16, tmp_path / "one")
    ddp_metrics, ddp_weights, (rank0, rank1) = fit(colour_folder, 2, 8, tmp_path / "two")
    assert rank0 == rank1 == single_trainable  # same trainable set on every rank at every step
    assert any("backbone.layer3.0.conv1.weight" in step for step in rank0)  # unfreezing happened
    assert single_metrics["val/acc"] > 0.5  # it learned something (chance 0.33)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("val/acc", "val/f1", "val/loss", "train/loss_epoch"):
        assert abs(ddp_metrics[key] - single_metrics[key]) < 1e-4, (key, ddp_metrics[key], single_metrics[key])
