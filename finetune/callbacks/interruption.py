"""SIGTERM or Ctrl+C: finish the batch, save last.ckpt, exit; resume exactly from any checkpoint.

What Lightning 2.6 does by itself: its signal connector catches SIGTERM (and passes it to
DDP children), and the loops then raise `SIGTERMException` (a SystemExit) at the end of the
running batch, after its optimizer step, or mid-validation. It saves nothing: its
`OnExceptionCheckpoint` would save on any crash as well (a half-done step, NaN weights) and
makes every later `fit` resume by itself. A KeyboardInterrupt lands wherever Python is, even
inside an optimizer step, and Lightning exits with status 1. A checkpoint taken mid-epoch
restarts that epoch's data from its first batch ("your dataloader is not resumable").

This callback, always on in the CLI:
- turns the first Ctrl+C into that same SIGTERM path (a second Ctrl+C quits at once);
- on `SIGTERMException` saves last.ckpt through our ModelCheckpoint, so `--ckpt_path last`
  finds it, says so, and exits with 128 + signal (143 for SIGTERM, 130 for Ctrl+C), no
  traceback;
- writes into every checkpoint where in the data order it was taken (epoch, batches done),
  which `finetune.data.sampling.train_sampler` reads to skip the batches already trained.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.callbacks.nonfinite import NonFiniteLossError, check_before_saving

log = logging.getLogger(__name__)

POSITION_KEY = "finetune_data_position"  # [epoch, batches of it already trained]


def data_position(trainer) -> tuple[int, int]:
    """(epoch, batches of that epoch whose optimizer step is done) for the training state now."""
    progress = trainer.fit_loop.epoch_progress.current
    if progress.started > progress.processed:  # inside epoch `processed`
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done < trainer.num_training_batches:
            return progress.processed, done
        return progress.processed + 1, 0
    return progress.processed, 0  # between epochs, or in the epoch-end hooks


def resume_position(trainer) -> tuple[int, int] | None:
    """The position restored from the checkpoint being resumed, taken once (for the sampler)."""
    callback = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, Interruption)), None)
    if callback is None or callback.resume_position is None:
        return None
    position, callback.resume_position = callback.resume_position, None
    return position


class Interruption(Callback):
    """See the module docstring; `finetune fit` always has it (config section `interruption`).

    handle_sigint: the first Ctrl+C finishes the batch, saves and exits like SIGTERM; false
        leaves Ctrl+C to Lightning (stop at once, no checkpoint).
    """

    def __init__(self, handle_sigint: bool = True) -> None:
        self.handle_sigint = handle_sigint
        self.resume_position: tuple[int, int] | None = None
        self._signal: int | None = None
        self._pid: int | None = None
        self._previous_sigint = None

    # -- signals ---------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its SIGTERM handler (it restores every handler it saw
        # then at teardown, so ours must come later). Forked DataLoader workers may inherit
        # it; they ignore stop signals anyway (finetune/data/sampling.py).
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            self._signal, self._pid = None, os.getpid()
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        lightning_handles_sigterm = callable(signal.getsignal(signal.SIGTERM))
        if self._signal is not None or not lightning_handles_sigterm:
            self._restore_sigint()
            raise KeyboardInterrupt
        self._signal = signal.SIGINT
        print("\nCtrl+C: stopping after this batch and saving last.ckpt (Ctrl+C again to quit at once)", flush=True)
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler: the loops stop at the batch end

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_sigint()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        signum = self._signal or signal.SIGTERM
        exception.code = 128 + int(signum)  # what a shell reports for a process the signal ended
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return  # nothing trained since the checkpoint this run started from
        name = "Ctrl+C" if signum == signal.SIGINT else "SIGTERM"
        epoch, done = data_position(trainer)
        where = f"step {trainer.global_step} (epoch {epoch}, {done} batches done)"
        try:
            path = save_interrupted(trainer)
        except NonFiniteLossError as err:
            log.error("%s: stopped at %s without saving: %s", name, where, err)
        else:
            if trainer.is_global_zero:
                resume = "last" if Path(path).name.startswith("last") else path
                print(f"{name}: stopped at {where}; saved {path}. Resume with --ckpt_path {resume}", flush=True)

    # -- where in the data a checkpoint was taken --------------------------------------------

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[POSITION_KEY] = list(data_position(trainer))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        position = checkpoint.get(POSITION_KEY)
        self.resume_position = tuple(position) if position else None


def save_interrupted(trainer) -> str:
    """Save the current state as last.ckpt (where `--ckpt_path last` looks); return the path."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and hasattr(checkpoint, "save_last_now") and checkpoint.save_last is True:
        return checkpoint.save_last_now(trainer)
    check_before_saving(trainer)
    path = str(Path(getattr(checkpoint, "dirpath", None) or trainer.default_root_dir) / "interrupted.ckpt")
    trainer.save_checkpoint(path)
    return path
