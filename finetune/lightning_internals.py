"""Every private Lightning attribute finetune uses, behind one door.

Checked against Lightning 2.4-2.6; tests/test_lightning_internals.py fails loudly when one of
them moves. Each is used because the public API has no equivalent (said per function).
"""

from __future__ import annotations


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
