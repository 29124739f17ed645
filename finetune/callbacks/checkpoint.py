"""ModelCheckpoint whose last.ckpt is always the latest state."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning 2.6 refreshes last.ckpt only in epochs where a top-k checkpoint was saved
    ("Only save last checkpoint if a checkpoint was actually saved in this step"). When the
    monitored metric stops improving, `--ckpt_path last` would then go back to the best epoch
    and silently redo the epochs since. Save last.ckpt after every validation regardless."""

    def _refresh_last(self, trainer) -> None:
        # _should_skip_saving_checkpoint is also true when something was saved at this step.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)
