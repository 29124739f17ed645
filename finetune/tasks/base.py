"""What every task shares: the optimizer and LR schedule built from plain hyperparameters."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from finetune.optim import build_optimizer, decay_groups, warmup_then


class FinetuneTask(L.LightningModule):
    """Subclasses set `self.backbone` and `self.head` and save these hyperparameters:
    optimizer, lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr_ratio."""

    backbone: nn.Module
    head: nn.Module

    def param_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def configure_optimizers(self):
        hp = self.hparams
        groups = decay_groups(self.param_modules(), hp.weight_decay)
        optimizer = build_optimizer(hp.optimizer, groups, hp.lr, hp.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, round(hp.warmup_epochs * steps_per_epoch)) if total > 1 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_then(hp.scheduler, total, warmup, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Logged here rather than by LearningRateMonitor, which refuses to run without a
        # logger (`--trainer.logger false`). Group names come from `decay_groups`.
        for group in self.optimizers().optimizer.param_groups:
            self.log(f"lr/{group['name']}", group["lr"], on_step=True, on_epoch=False)
