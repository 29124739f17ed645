"""Stop training at the first NaN or inf loss, keeping the last good checkpoint.

Reading the loss on the host every step (`loss.item()`, or a callback's
`if not torch.isfinite(loss)`) waits for the GPU to finish the step: it stalls the
pipeline the data loader and the CUDA queue work to keep full. Lightning's
`detect_anomaly` is worse (autograd anomaly mode, several times slower). So the guard keeps
its flag on the device: each step adds one tiny kernel that records the first non-finite
loss of the window, with no sync; the host reads the flag on the steps the loggers write
(which wait for the GPU anyway) and at least every `check_every_n_steps` steps (every step on
CPU, where reading costs nothing), at validation and epoch ends, and always before a
checkpoint is written. The trade-off: on a GPU, training may run up to N steps past
the bad one before it stops. Those steps are lost anyway, and no checkpoint is saved in
between, so last.ckpt and best-*.ckpt keep the last good weights.
"""

from __future__ import annotations

import math
import os

import torch
from lightning.pytorch import Callback

from finetune.errors import FinetuneError
from finetune.lightning_internals import is_logging_step


class NonFiniteLossError(FinetuneError, RuntimeError):
    """Training produced a NaN/inf loss or weights; the message says where and the likely cause."""


class NonFiniteGuard(Callback):
    """Raises NonFiniteLossError once the training loss (or, before a save, any weight) is NaN or inf.

    check_every_n_steps: how often the host reads the device-side flag on an accelerator
        (CPU: every step). Larger means fewer syncs, and more steps run after a bad one.
    """

    cpu_checks_every_step = True  # reading a CPU tensor costs nothing (tests turn it off)

    def __init__(self, check_every_n_steps: int = 50):
        if check_every_n_steps < 1:
            raise ValueError(f"nonfinite.check_every_n_steps: {check_every_n_steps} must be at least 1")
        self.check_every_n_steps = check_every_n_steps
        self._reset_window()

    def _reset_window(self) -> None:
        self._count: torch.Tensor | None = None  # steps seen in this window, on the device
        self._first_bad: torch.Tensor | None = None  # index of the first bad step in the window, or -1
        self._bad_loss: torch.Tensor | None = None  # its loss value
        self._steps: list[tuple[int, int, int]] = []  # (global step, epoch, batch) per step, on the host

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float().reshape(())
        if self._count is None or self._count.device != loss.device:
            self._count = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        # All on the device, no host sync: remember the first non-finite step of the window.
        new_bad = (self._first_bad < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(new_bad, self._count, self._first_bad)
        self._bad_loss = torch.where(new_bad, loss, self._bad_loss)
        self._count += 1
        # The optimizer step of this batch is done: global_step already counts it.
        self._steps.append((trainer.global_step, trainer.current_epoch, batch_idx))
        every = 1 if loss.device.type == "cpu" and self.cpu_checks_every_step else self.check_every_n_steps
        # Logging steps read metrics on the host anyway: checking there adds no stall of its own.
        if len(self._steps) >= every or is_logging_step(trainer):
            self.check(trainer, pl_module, batch=batch)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module, weights: bool = False, batch=None) -> None:
        """Read the flag (one sync); with `weights`, also check every parameter. Raise if bad.

        `batch`: the batch of the step just done, examined when that step is the bad one.
        """
        message = None
        if self._first_bad is not None:
            first = int(self._first_bad.item())
            if first >= 0:
                step, epoch, index = self._steps[first]
                inputs = _nonfinite_inputs(batch) if batch is not None and first == len(self._steps) - 1 else None
                loss = float(self._bad_loss.item())
                message = self._message(trainer, pl_module, loss, step, epoch, index, inputs, batch is not None)
        if message is None and weights:
            message = _nonfinite_weights(trainer, pl_module)
        bad = message is not None
        if trainer.world_size > 1:  # every rank stops together, or the others hang in the next all-reduce
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if self._first_bad is not None and not bad:
            self._first_bad.fill_(-1)
            self._count.zero_()
            self._steps.clear()
        if bad:
            raise NonFiniteLossError(message or "train/loss is not finite on another rank; training stopped")

    @staticmethod
    def _message(trainer, pl_module, loss, step, epoch, batch, inputs: str | None, inputs_checked: bool) -> str:
        where = f"train/loss is {'nan' if math.isnan(loss) else 'inf'} at step {step} (epoch {epoch}, batch {batch})"
        if inputs:
            return f"{where}; {_kept(trainer)}. Cause: NaN/inf in that input batch ({inputs})"
        lr = getattr(getattr(pl_module, "hparams", None), "lr", None)
        cause = "the learning rate is too high" + (f" (model.lr {lr:g}; try 10x lower, or `finetune lr-find`)" if lr else "")
        precision = str(trainer.precision)
        if precision.startswith("16"):
            cause += f", or fp16 overflow (trainer.precision {precision}: try bf16-mixed or 32)"
        if not inputs_checked:
            cause += ", or NaN/inf in that input batch"
        return f"{where}; {_kept(trainer)}. Likely cause: {cause}"


def _nonfinite_inputs(batch) -> str | None:
    """Which float tensors of the batch hold NaN/inf (and a file of it), or None."""
    if not isinstance(batch, dict):
        return None
    bad = [k for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return None
    paths, values = batch.get("path"), batch[bad[0]]
    example = ""
    if isinstance(paths, (list, tuple)) and values.ndim > 0 and len(paths) == len(values):
        row = int((~torch.isfinite(values)).reshape(len(values), -1).any(dim=1).nonzero()[0])
        example = f" of {paths[row]}"
    return f"{', '.join(bad)}{example}"


def _kept(trainer) -> str:
    checkpoint = trainer.checkpoint_callback
    # A save being refused has already put its own name in these: only files that exist count.
    paths = [getattr(checkpoint, name, "") for name in ("last_model_path", "best_model_path")]
    path = next((p for p in paths if p and os.path.isfile(p)), None)
    if path:
        return f"training stopped, and the last good checkpoint is kept ({path})"
    return "training stopped (no checkpoint had been saved yet)"


def _nonfinite_weights(trainer, pl_module) -> str | None:
    params = [p.detach() for p in pl_module.parameters()]
    if not params:
        return None
    finite = torch.stack([torch.isfinite(p).all() for p in params])
    if bool(finite.all()):  # one sync for all of them
        return None
    name = next(n for (n, _), ok in zip(pl_module.named_parameters(), finite.tolist()) if not ok)
    return (
        f"weights became non-finite ({name}) by step {trainer.global_step}; {_kept(trainer)}. "
        "Likely cause: the learning rate is too high"
    )


def check_before_saving(trainer) -> None:
    """Raise NonFiniteLossError instead of letting a checkpoint with NaN/inf in it be written."""
    if trainer.state.fn != "fit" or trainer.lightning_module is None:
        return
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)
    if guard is not None:
        guard.check(trainer, trainer.lightning_module, weights=True)
    else:
        message = _nonfinite_weights(trainer, trainer.lightning_module)
        if message:
            raise NonFiniteLossError(message)
