"""SIGTERM or Ctrl+C: finish the batch, save last.ckpt, exit; resume exactly from any checkpoint.

What Lightning 2.6 does by itself: its signal connector catches SIGTERM (and passes it to
DDP children), and the loops then raise `SIGTERMException` (a SystemExit) at the end of the
running batch, after its optimizer step, or mid-validation. It saves nothing: its
`OnExceptionCheckpoint` would save on any crash as well (a half-done step, NaN weights) and
makes every later `fit` resume by itself. A KeyboardInterrupt lands wherever Python is, even
inside an optimizer step, and Lightning exits with status 1. A checkpoint taken mid-epoch
restarts that epoch's data from its first batch ("your dataloader is not resumable").

Under DDP, Lightning 2.6 also broadcasts a SIGTERM flag from rank 0 before every batch (a
host sync per step), and its signal handler runs a collective itself: ranks signalled at
different moments can pair the wrong collectives and hang.

This callback, always on in the CLI:
- turns the first Ctrl+C into that same SIGTERM path (a second Ctrl+C quits at once);
- under DDP, replaces Lightning's SIGTERM handler by one that only notes the signal; every
  `check_every_n_steps` training steps the ranks agree, over a CPU (gloo) all-reduce that
  does not wait for the GPU, whether any of them was signalled, so all stop after the same
  batch, whether the signal reached one process or the whole process group;
- on `SIGTERMException` saves last.ckpt through our ModelCheckpoint, so `--ckpt_path last`
  finds it, says so, and exits with 128 + signal (143 for SIGTERM, 130 for Ctrl+C), no
  traceback.

Where in the data order a checkpoint was taken (epoch, batches done) is in the DataModule's
own state (finetune.data.resume): the resumed run skips the batches already trained.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.callbacks.nonfinite import NonFiniteLossError, check_before_saving
from finetune.lightning_internals import data_position, request_stop, skip_sigterm_broadcast

log = logging.getLogger(__name__)


class Interruption(Callback):
    """See the module docstring; `finetune fit` always has it (config section `interruption`).

    handle_sigint: the first Ctrl+C finishes the batch, saves and exits like SIGTERM; false
        leaves Ctrl+C to Lightning (stop at once, no checkpoint).
    check_every_n_steps: under DDP, how often the ranks agree on stopping (a CPU all-reduce of
        one number, no GPU sync); a signal stops training at most this many steps later.
    """

    def __init__(self, handle_sigint: bool = True, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"interruption.check_every_n_steps: {check_every_n_steps} must be at least 1")
        self.handle_sigint = handle_sigint
        self.check_every_n_steps = check_every_n_steps
        self._signal: int | None = None  # the signal this process received (SIGINT or SIGTERM)
        self._pid: int | None = None
        self._previous_sigint = None
        self._trainer = None
        self._group = None  # process group of the stop agreement

    # -- signals ---------------------------------------------------------------------------

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def _install(self, trainer) -> None:
        # After Lightning registered its SIGTERM handler (it restores every handler it saw
        # then at teardown, so ours must come later). Forked DataLoader workers may inherit
        # them; they ignore stop signals anyway (finetune/data/loader.py).
        if threading.current_thread() is not threading.main_thread() or self._trainer is trainer:
            return
        self._trainer, self._signal, self._pid = trainer, None, os.getpid()
        if self.handle_sigint:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        if trainer.world_size > 1:
            skip_sigterm_broadcast(trainer)
            self._group = _agreement_group()
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        lightning_handles_sigterm = callable(signal.getsignal(signal.SIGTERM))
        if self._signal is not None or not lightning_handles_sigterm:
            self._restore_sigint()
            raise KeyboardInterrupt
        self._signal = signal.SIGINT
        if self._trainer is None or self._trainer.is_global_zero:
            print("\nCtrl+C: stopping after this batch and saving last.ckpt (Ctrl+C again to quit at once)", flush=True)
        signal.raise_signal(signal.SIGTERM)  # the SIGTERM path: Lightning's handler, or ours under DDP

    def _on_sigterm(self, signum, frame) -> None:
        """Under DDP: note the signal, nothing else: no collective in a signal handler, and no
        need to pass it on (Lightning does): the next agreement tells every rank."""
        if os.getpid() == self._pid:
            self._signal = self._signal or signal.SIGTERM  # after a Ctrl+C, still Ctrl+C

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # A step number every rank shares: all of them take part in the same all-reduce.
        if trainer.world_size > 1 and trainer.global_step % self.check_every_n_steps == 0:
            agreed = torch.tensor([self._signal or 0], dtype=torch.int32)  # a CPU tensor: no GPU sync
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
            signum = int(agreed[0])  # on the CPU: no GPU sync
            if signum:
                self._signal = self._signal or signum  # the exit status of a rank nobody signalled
                request_stop(trainer)  # every rank raises at the end of this same batch

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_sigint()
        self._trainer = None

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


def _agreement_group():
    """The default group if it runs on the CPU (gloo), else a gloo group beside NCCL: a CPU
    tensor all-reduce then needs no GPU work and waits for no queued kernel."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def save_interrupted(trainer) -> str:
    """Save the current state as last.ckpt (where `--ckpt_path last` looks); return the path."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and hasattr(checkpoint, "save_last_now") and checkpoint.save_last is True:
        return checkpoint.save_last_now(trainer)
    check_before_saving(trainer)
    path = str(Path(getattr(checkpoint, "dirpath", None) or trainer.default_root_dir) / "interrupted.ckpt")
    trainer.save_checkpoint(path)
    return path
