"""Exponential moving average of the weights: validated, checkpointed, exported and predicted with.

    trainer:
      callbacks:
        - class_path: finetune.callbacks.EMA
          init_args: {decay: 0.9998, warmup: true}
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from timm.utils.model_ema import ModelEmaV3


class EMA(Callback):
    """timm's ModelEmaV3 of the task's network (`pl_module.net`), updated after every optimizer
    step. Validation runs on the average (so the best checkpoint is the best average), every
    checkpoint's `state_dict` holds it (so `validate`/`test`/`predict --ckpt_path` and export use
    it), and after fit the network is left holding it. The live weights travel in the
    checkpoint as `current_model_state`, Lightning's WeightAveraging layout: a resumed run
    continues both exactly.

    `decay`: the average's decay per step; `warmup`: timm's schedule, decay
    1 - (1 + step)^-`warmup_power` until it reaches `decay`, so a short run's average is not
    mostly the initial weights; `update_after_step`: plain copies before this step.

    Parameters that a freeze schedule holds fixed stay bit-identical in the average (a lerp of
    a value towards itself is that value); under DDP every rank averages the same weights.

    Not Lightning's EMAWeightAveraging: its torch AveragedModel reads a step counter that lives
    on the GPU twice per step (two host syncs), has no warmup, and copies the whole
    LightningModule, metrics included."""

    def __init__(self, decay: float = 0.9998, warmup: bool = True, warmup_power: float = 0.75, update_after_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"trainer.callbacks: EMA decay {decay} is out of range; pass a number in [0, 1), e.g. 0.9998")
        self.decay, self.warmup, self.warmup_power, self.update_after_step = decay, warmup, warmup_power, update_after_step
        self.ema: ModelEmaV3 | None = None
        self._swapped = False
        self._last_step = -1
        self._restored_average: dict | None = None  # from a resumed checkpoint, until on_fit_start builds the EMA

    def on_fit_start(self, trainer, pl_module) -> None:
        # Built here, not in setup: the strategy has now given the network its device, its dtype
        # (bf16-true) and any SyncBatchNorm, which the average must share to be swapped in.
        if self.ema is None:
            self.ema = ModelEmaV3(
                pl_module.net, decay=self.decay, use_warmup=self.warmup, warmup_power=self.warmup_power,
                update_after_step=self.update_after_step,
            )
            self.ema.requires_grad_(False)
        if self._restored_average is not None:
            self.ema.module.load_state_dict(self._restored_average)
            self._restored_average = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (gradient accumulation calls this every micro-batch). The step
        # is a Python int: the decay is computed on the host, no device value is read.
        if self.ema is not None and trainer.global_step > self._last_step:
            self.ema.update(pl_module.net, step=trainer.global_step)
            self._last_step = trainer.global_step

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.ema is not None and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.ema is not None:
            _copy(self.ema.module, pl_module.net)

    def _swap(self, pl_module) -> None:
        # Swap the tensors' storage, not their values: no copy, no extra memory.
        for average, live in zip(_tensors(self.ema.module), _tensors(pl_module.net)):
            average.data, live.data = live.data, average.data
        self._swapped = not self._swapped

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.ema is None:
            return
        live, average = (self.ema.module, pl_module.net) if self._swapped else (pl_module.net, self.ema.module)
        state = checkpoint["state_dict"]
        names = [f"net.{name}" for name in pl_module.net.state_dict()]
        checkpoint["current_model_state"] = {**state, **dict(zip(names, live.state_dict().values()))}
        checkpoint["state_dict"] = {**state, **dict(zip(names, average.state_dict().values()))}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Lightning has loaded `state_dict` (the average) into the module already; a resumed fit
        # trains on from the live weights. (A checkpoint without an average starts it from its
        # weights; validate/test/predict keep the average.)
        if trainer.state.fn != "fit" or "current_model_state" not in checkpoint:
            return
        average = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        pl_module.load_state_dict(checkpoint["current_model_state"])
        if self.ema is None:  # restored before on_fit_start builds it
            self._restored_average = average
        else:  # the LR range test restoring its own checkpoint mid-fit
            self.ema.module.load_state_dict(average)


def _tensors(module) -> list:
    return list(module.state_dict(keep_vars=True).values())


def _copy(source, target) -> None:
    for s, t in zip(_tensors(source), _tensors(target)):
        t.data.copy_(s.data)
