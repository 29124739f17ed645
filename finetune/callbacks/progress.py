"""A progress bar that reads training metrics on the steps the loggers write, not every batch."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

from finetune.lightning_internals import is_logging_step


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar (the CLI's default), plus the training step metrics
    (`train/loss_step`, ...), refreshed only on logging steps.

    Lightning converts every `prog_bar=True` tensor to a float after each batch (a host sync:
    the GPU queue drains every step), so the tasks log step metrics without `prog_bar`; this
    bar reads them where the loggers read them anyway, every `log_every_n_steps`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if is_logging_step(trainer):  # this step's values were just logged
            logged = trainer.logged_metrics
            self._step_metrics = {k: float(v) for k, v in logged.items() if k.startswith("train/") and k.endswith("_step")}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self._step_metrics}
