"""What every task shares: freeze/unfreeze schedule, per-stage LRs, optimizer and schedule,
DDP-exact evaluation, checkpoint hygiene and prediction.

A task declares its `contract` (finetune.contract), builds `self.net` (a finetune.models
network, from its own hyperparameters) and whatever trains beside it, then calls
`self.setup_finetuning(config)`. It saves these hyperparameters: optimizer, lr, weight_decay,
momentum, scheduler, warmup_epochs, min_lr_ratio, finetuning, preprocessing.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from finetune import finetuning as ft
from finetune.contract import TaskContract, class_names_of
from finetune.distributed import PaddingCounter, average_gradients, check_strategy
from finetune.lightning_internals import is_logging_step, log_now
from finetune.optim import build_optimizer, build_scheduler, decay_split
from finetune.tasks.running_means import RunningMeans
from finetune.weights import check_checkpoint_matches, plain_hyperparameters
from finetune.writers import WRITERS

HEAD_STAGE = -1  # stage index of the head's optimizer groups: always trainable
# Past this many classes per-class scalars flood the logger; W&B tables still have them.
MAX_PER_CLASS_SCALARS = 32


def _first(loaders):
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


class FinetuneTask(L.LightningModule):
    contract: ClassVar[TaskContract]
    net: nn.Module

    @property
    def class_names(self) -> list[str]:
        """The data's class names (`class_names`, linked by the CLI), else the class indices."""
        return class_names_of(self.hparams)

    @property
    def backbone(self) -> nn.Module:
        """The pretrained part, which the freeze/unfreeze schedule and per-stage LRs act on."""
        return self.net.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def setup_finetuning(self, config: ft.FinetuningConfig | None) -> None:
        self.stages = ft.backbone_stages(self.backbone)
        in_stages = sum(len(stage.params) for stage in self.stages)
        if in_stages != len(list(self.backbone.parameters())):
            raise RuntimeError(f"{type(self.backbone).__name__}: timm's group_matcher left parameters out of every stage")
        self.finetuning = ft.resolve(config, len(self.stages), [s.name for s in self.stages])
        self.trainable_stages = -1
        self.apply_finetuning(epoch=0)
        self._ddp_managed: set[int] = set()
        self._train_means: RunningMeans | None = None
        self._padding = PaddingCounter()

    def apply_finetuning(self, epoch: int) -> None:
        """Trainable stages for `epoch`: a pure function of it, so identical on every rank."""
        self.trainable_stages = ft.trainable_stage_count(self.finetuning, len(self.stages), epoch)
        ft.apply(self.backbone, self.stages, self.trainable_stages, self.finetuning["train_bn"], self.training)

    def configure_callbacks(self):
        # `model.lr: auto` (tasks whose `lr` accepts it): the LR range test runs at fit start.
        if self.hparams.get("lr") == "auto":
            from finetune.callbacks.lr_auto import LearningRateFromRangeTest

            return [LearningRateFromRangeTest()]
        return []

    def log_per_class(self, prefix: str, values) -> None:
        """`<prefix>/<class name>` scalars, for up to MAX_PER_CLASS_SCALARS classes."""
        if len(self.class_names) <= MAX_PER_CLASS_SCALARS:
            for name, value in zip(self.class_names, values):
                self.log(f"{prefix}/{name}", value, sync_dist=True)  # equal on all ranks already

    @staticmethod
    def reset_metrics(*metrics) -> None:
        # Reset outside inference mode: states re-created inside it are inference tensors,
        # and the next validation under fit's no_grad could not update them in place.
        with torch.inference_mode(False):
            for metric in metrics:
                metric.reset()

    def train(self, mode: bool = True):
        # Anyone's .train() (Lightning's, a user's) would put frozen BatchNorm back into
        # batch-statistics mode; re-assert the schedule's modes after it.
        super().train(mode)
        if getattr(self, "stages", None) is not None and self.trainable_stages >= 0:
            ft.apply(self.backbone, self.stages, self.trainable_stages, self.finetuning["train_bn"], mode)
        return self

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        # Fresh metric states in this process: ddp_spawn on CPU passes the model through shared
        # memory, and Lightning un-shares parameters and buffers but not torchmetrics states,
        # so every rank would add into the same tensors.
        self.reset_metrics(*(m for m in self.modules() if isinstance(m, Metric)))
        # Runs before the strategy wraps the model in DDP: what is trainable now is what DDP
        # will all-reduce. Stages unfrozen later are averaged in optimizer_step's closure.
        self._ddp_managed = {id(p) for p in self.parameters() if p.requires_grad}
        # The data's preprocessing goes into the hyperparameters, so that every checkpoint says
        # how its images were prepared (export, the Lightning-free runner). The CLI links it at
        # construction; a task built in Python gets it here.
        datamodule = self.trainer.datamodule
        if self.hparams.get("preprocessing") is None and hasattr(datamodule, "preprocessing_config"):
            self.hparams["preprocessing"] = datamodule.preprocessing_config

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which task to rebuild, also for a task built in Python (LightningCLI stores it itself).
        hparams = checkpoint.setdefault("hyper_parameters", {})
        hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        plain_hyperparameters(checkpoint)  # loadable with torch.load(weights_only=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Another backbone or class count: one line, before load_state_dict's size-mismatch wall.
        try:
            path = self.trainer.ckpt_path
        except RuntimeError:  # load_from_checkpoint: no trainer
            path = None
        check_checkpoint_matches(self.hparams, checkpoint, path)
        rename_legacy_keys(checkpoint.get("state_dict", {}), self.state_dict())

    def on_train_start(self) -> None:
        # Lightning 2.6 skips on_train_epoch_start when it resumes mid-epoch: without this, a
        # run resumed inside an unfreeze epoch would train that epoch with the construction's
        # (epoch 0) trainable stages.
        self.apply_finetuning(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self.apply_finetuning(self.current_epoch)
        # sync_dist on values equal on every rank: a no-op, but Lightning warns without it under DDP.
        self.log("train/trainable_params", float(ft.count_trainable(self)), on_step=False, on_epoch=True, sync_dist=True)
        self._train_means = None

    def log_training(self, batch_size: int, **values: torch.Tensor) -> None:
        """`train/<name>_step`: the mean since the last logged step, on the steps the logger
        writes; `train/<name>_epoch` at epoch end. Means are weighted by batch size.

        Not `self.log` on every step: in Lightning 2.6 each call costs ~0.6 ms of CPU (it moves
        its result object to the value's device every time), more than the rest of Lightning's
        loop; two a step took framework overhead past 1 ms (benchmarks/overhead.py). The sums
        stay on the device, so no step waits for the GPU either."""
        if self._train_means is None:
            self._train_means = RunningMeans(list(values))
        self._train_means.add(batch_size, values.values())
        if is_logging_step(self.trainer):
            # Not prog_bar=True: Lightning converts every progress-bar tensor to a float after
            # each batch, a host sync per step; finetune.callbacks.progress shows these instead.
            for name, mean in self._train_means.interval_means().items():
                self.log(f"train/{name}_step", mean, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        if self._train_means is not None:
            reduce = partial(self.trainer.strategy.reduce, reduce_op="sum")  # exact means over all ranks
            for name, mean in self._train_means.epoch_means(reduce).items():
                self.log(f"train/{name}_epoch", mean, prog_bar=name == "loss", on_step=False, on_epoch=True, sync_dist=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Under DDP, average the gradients of stages unfrozen after DDP wrapped the model right
        after backward, inside the closure: before the AMP grad scaler checks each rank's
        gradients for inf/NaN (ranks that disagreed would skip different steps and diverge),
        before gradient clipping, and before any callback's on_before_optimizer_step."""
        if self.trainer.world_size > 1 and optimizer_closure is not None:
            optimizer_closure = partial(self._closure_then_average, optimizer_closure)
        optimizer.step(closure=optimizer_closure)

    def _closure_then_average(self, closure):
        result = closure()  # forward and backward (with gradient accumulation: the last micro-batch)
        late = [p for p in self.parameters() if p.grad is not None and id(p) not in self._ddp_managed]
        average_gradients(late, self.trainer.world_size)
        return result

    # -- evaluation under DDP: padded duplicates left out ------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._padding = PaddingCounter(_first(self.trainer.val_dataloaders))

    def on_test_epoch_start(self) -> None:
        self._padding = PaddingCounter(_first(self.trainer.test_dataloaders))

    def update_metrics(self, outputs: torch.Tensor, targets: torch.Tensor, loss, *metrics) -> None:
        """Validation/test: update the `loss` mean (`self._loss`, weighted by samples) and
        `metrics` with the batch's real samples. Under DDP the sampler repeats up to
        world_size - 1 samples so that every rank gets as many; they are left out here, so N
        processes compute exactly what one does."""
        keep = self._padding.keep(len(targets))
        if keep:
            outputs, targets = outputs[:keep], targets[:keep]
            # The batch mean once per sample, not weight=keep: MeanMetric(nan_strategy="disable")
            # replaces weights by ones (torchmetrics #3434).
            loss.update(self._loss(outputs, targets).expand(keep))
            for metric in metrics:
                metric.update(outputs, targets)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # `lr/<group>` on the steps the logger writes, as LearningRateMonitor does it (straight
        # to the loggers: through self.log, a dozen values would cost ~0.6 ms each, and would sit
        # in Lightning's results for every later step of the epoch), but a frozen group's
        # effective LR is 0, and without a logger (`--trainer.logger false`) it is simply off.
        if not self.loggers or not is_logging_step(self.trainer):
            return
        rates = {}
        for group in self.optimizers().optimizer.param_groups:
            frozen = group["stage"] != HEAD_STAGE and group["stage"] >= self.trainable_stages
            rates[f"lr/{group['name']}"] = 0.0 if frozen else group["lr"]
        log_now(self.trainer, rates)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The network's outputs that the contract's writer reads (only those leave the device)."""
        outputs = self.net.predict(batch["image"])
        kept = {name: outputs[name] for name in WRITERS[self.contract.writer].reads}
        return {"path": batch["path"], **kept, "size": batch.get("size")}

    def param_groups(self) -> list[dict]:
        """The head at `lr`, then each backbone stage at `lr * multiplier`: all from step one."""
        hp = self.hparams
        # Everything outside the backbone (heads, necks, margin heads) trains at the base LR.
        pretrained = {id(p) for p in self.backbone.parameters()}
        new_layers = [p for p in self.parameters() if id(p) not in pretrained]
        groups = decay_split("head", new_layers, hp.weight_decay, hp.lr, stage=HEAD_STAGE)
        multipliers = ft.lr_multipliers(self.finetuning, len(self.stages))
        for index, (stage, mult) in enumerate(zip(self.stages, multipliers)):
            groups += decay_split(stage.name, stage.params, hp.weight_decay, hp.lr * mult, stage=index)
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(hp.optimizer, self.param_groups(), hp.lr, hp.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, round(hp.warmup_epochs * steps_per_epoch)) if total > 1 else 0
        return {"optimizer": optimizer, "lr_scheduler": build_scheduler(hp.scheduler, optimizer, total, warmup, hp.min_lr_ratio)}


def rename_legacy_keys(saved: dict, expected: dict) -> None:
    """Checkpoints from before the networks moved into `self.net` hold `backbone.*`, `head.*`:
    their keys, in place, under `net.` where that is where the task keeps them now."""
    for key in [k for k in saved if k not in expected and f"net.{k}" in expected]:
        saved[f"net.{key}"] = saved.pop(key)
