"""ModelCheckpoint whose last.ckpt is always the latest state, and never holds NaN weights."""

from __future__ import annotations

from finetune import lightning_internals as internals
from finetune.callbacks.nonfinite import check_before_saving


class ModelCheckpoint(internals.CheckedModelCheckpoint):
    """Lightning 2.6 refreshes last.ckpt only in epochs where a top-k checkpoint was saved
    ("Only save last checkpoint if a checkpoint was actually saved in this step"). When the
    monitored metric stops improving, `--ckpt_path last` would then go back to the best epoch
    and silently redo the epochs since. Save last.ckpt after every validation regardless.

    `save_last_every_n_train_steps`: also refresh last.ckpt every N optimizer steps, so that a
    run killed without warning (`kill -9`, a lost node) loses at most N steps; the resumed run
    skips the batches already trained (finetune/data/resume.py). Lightning's own
    `every_n_train_steps` is no substitute: it also saves top-k files mid-epoch on the last
    validation's score, waits for the first validation before saving anything, and turns
    the per-epoch top-k saves off.

    Every save first checks that the loss and the weights are finite (NonFiniteGuard), so a
    diverged run never overwrites the last good last.ckpt or best checkpoint.
    """

    def __init__(self, *args, save_last_every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if save_last_every_n_train_steps is not None and save_last_every_n_train_steps < 1:
            raise ValueError(
                f"checkpoint.save_last_every_n_train_steps: {save_last_every_n_train_steps} is not a positive "
                "number of steps; leave it unset to save only at validation"
            )
        self.save_last_every_n_train_steps = save_last_every_n_train_steps
        self._last_step_save = 0  # steps repeat while gradients accumulate

    def before_write(self, trainer) -> None:
        check_before_saving(trainer)

    def save_last_now(self, trainer) -> str:
        """Write last.ckpt with the current state (interruption, step saves); return its path.

        Does not count as "saved at this step" for top-k: the validation that may follow at
        this step still gets to save a best checkpoint.
        """
        self._last_step_save = trainer.global_step
        internals.save_last(self, trainer, counts_as_saved=False)
        return self.last_model_path

    def _refresh_last(self, trainer) -> None:
        # may_save_now is also false when something was saved at this step.
        if self.save_last is True and internals.may_save_now(self, trainer):
            internals.save_last(self, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.save_last_every_n_train_steps
        step = trainer.global_step
        if (
            every and self.save_last is True and step % every == 0 and step != self._last_step_save
            and internals.may_save_now(self, trainer)
        ):
            self.save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not internals.saves_at_train_epoch_end(self, trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if internals.saves_at_train_epoch_end(self, trainer):
            self._refresh_last(trainer)
