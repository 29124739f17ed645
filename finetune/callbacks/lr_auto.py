"""`model.lr: auto`: the learning rate found by Lightning's LR range test, then training at it.

What fastai's `lr_find` then `fine_tune` does, in one run. The task adds this callback itself
(`configure_callbacks`) when its `lr` is "auto".
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import LearningRateFinder

from finetune.lr_find import epochs_unbounded, report

log = logging.getLogger(__name__)
# What the optimizer is built with until the test has run (configure_optimizers needs a number),
# and what training uses if the test suggests nothing.
FALLBACK_LR = 1e-3


class LearningRateFromRangeTest(LearningRateFinder):
    """Runs the range test at fit start and sets `model.hparams.lr` to its suggestion.

    Not Lightning's `update_attr=True`: that writes one LR into every parameter group, flattening
    the per-stage LRs, and leaves the schedule's warmup and cosine built around the old value.
    Here the optimizer and schedule are built again from the new `lr` by the task's own
    `configure_optimizers`. The found LR is in the checkpoint's hyperparameters; a resumed run
    does not search again (its optimizer and schedule state carry the LRs).

    The test's steps run through the task's epochs as training would: with a freeze schedule
    and fewer than `num_training_steps` batches an epoch, its later steps train the stages
    unfrozen at epoch 1 too."""

    def __init__(self, num_training_steps: int = 100):
        super().__init__(num_training_steps=num_training_steps, update_attr=False)
        self._found: float | None = None  # the suggestion trained at, kept in the callback's state

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and pl_module.hparams.lr == "auto":
            pl_module.hparams.lr = FALLBACK_LR
            self._search = True
        else:
            self._search = False

    def state_dict(self) -> dict:
        return {"lr": self._found}

    def load_state_dict(self, state_dict: dict) -> None:
        self._found = state_dict.get("lr")

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._search:
            return
        if trainer.ckpt_path is not None:  # resumed: no new search; later checkpoints keep saying what was found
            if self._found is not None:
                pl_module.hparams.lr = self._found
            return
        with epochs_unbounded(trainer):
            self.lr_find(trainer, pl_module)
        suggestion = report(self.optimal_lr, trainer)
        if suggestion is None:
            log.warning("model.lr: auto: the range test suggested no learning rate; training at %.1e", FALLBACK_LR)
            return
        log.info("model.lr: auto: training at %.2e, the LR range test's suggestion", suggestion)
        pl_module.hparams.lr = self._found = float(suggestion)
        trainer.strategy.setup_optimizers(trainer)  # per-stage groups, warmup and decay around the new LR
