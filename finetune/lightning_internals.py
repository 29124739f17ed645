"""Every private Lightning attribute finetune uses, behind one door.

Checked against Lightning 2.6.6 (pyproject allows 2.4 to 2.6; `pip show lightning` says which
one runs). tests/test_lightning_internals.py names each private attribute below and fails,
naming it, when an upgrade moves one; run it first after changing Lightning's version. Each is
used because the public API has no equivalent (said per function); nothing outside this module
touches a private Lightning attribute.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


def is_logging_step(trainer) -> bool:
    """Whether the loggers write this training step (`log_every_n_steps`): the steps on which
    reading values on the host costs no extra stall. Lightning's own test, not re-derived."""
    return trainer._logger_connector.should_update_logs


def log_now(trainer, metrics: dict[str, float]) -> None:
    """Straight to the loggers, as LearningRateMonitor does: `self.log` costs ~0.6 ms a value."""
    trainer._logger_connector.log_metrics(metrics)


def request_stop(trainer) -> None:
    """Stop as Lightning stops on SIGTERM: its loops raise SIGTERMException at the end of the
    running batch (after its optimizer and LR-scheduler steps) or mid-validation."""
    trainer._signal_connector.received_sigterm = True


def skip_sigterm_broadcast(trainer) -> None:
    """Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch under
    DDP and reads it with `.item()`: a host sync per step, and a collective that pairs with the
    one its signal handler runs, so ranks signalled at different steps can hang.
    finetune.callbacks.interruption agrees on stopping instead."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):  # not in Lightning < 2.6
        loop._broadcast_sigterm_tensor = lambda: None


def data_position(trainer) -> tuple[int, int]:
    """(epoch, batches of that epoch whose optimizer step is done) for the training state now,
    from the fit loop's progress counters (no public API says where in an epoch training is)."""
    progress = trainer.fit_loop.epoch_progress.current
    if progress.started > progress.processed:  # inside epoch `processed`
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done < trainer.num_training_batches:
            return progress.processed, done
        return progress.processed + 1, 0
    return progress.processed, 0  # between epochs, or in the epoch-end hooks


# ---- ModelCheckpoint --------------------------------------------------------------------
# finetune.callbacks.checkpoint refreshes last.ckpt on its own schedule. ModelCheckpoint's
# public API saves only on Lightning's schedule (top-k, then last only when a top-k file was
# written), so these reach its private bookkeeping.


class CheckedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that calls `before_write(trainer)` before writing any file (top-k, last,
    on exception). The public hook, Callback.on_save_checkpoint, is skipped when
    `save_weights_only` is set, so it cannot refuse every write."""

    def before_write(self, trainer) -> None:
        """Raise to stop this file from being written."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self.before_write(trainer)
        super()._save_checkpoint(trainer, filepath)


def may_save_now(checkpoint: ModelCheckpoint, trainer) -> bool:
    """ModelCheckpoint's own test: fitting, not sanity checking or fast_dev_run, and nothing
    saved yet at this optimizer step."""
    return not checkpoint._should_skip_saving_checkpoint(trainer)


def saves_at_train_epoch_end(checkpoint: ModelCheckpoint, trainer) -> bool:
    """Whether `checkpoint` saves at the end of the training epoch rather than after validation
    (no validation, or `save_on_train_epoch_end`); Lightning decides from settings it keeps
    private."""
    return checkpoint._should_save_on_train_epoch_end(trainer)


def save_last(checkpoint: ModelCheckpoint, trainer, counts_as_saved: bool = True) -> None:
    """Write last.ckpt now, named, versioned and announced to the loggers as ModelCheckpoint
    does. `counts_as_saved=False`: a validation later at this same step may still save a top-k
    file (ModelCheckpoint saves nothing twice at one step)."""
    saved_step = checkpoint._last_global_step_saved
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
    if not counts_as_saved:
        checkpoint._last_global_step_saved = saved_step


# ---- WandbLogger ------------------------------------------------------------------------


def finish_wandb_run(logger, exit_code: int) -> None:
    """Finish the W&B run `logger` started, if it started one, and forget it, so that the next
    logger in this process (a notebook, a test) starts its own run instead of writing into this
    one. The public `logger.experiment` would start a run to finish it."""
    run = logger._experiment
    if run is not None and hasattr(run, "finish"):  # not the no-op stand-in of ranks > 0
        run.finish(exit_code=exit_code)
        logger._experiment = None
