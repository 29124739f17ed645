"""Embedding outputs for people: W&B ROC curve and projector table."""

from __future__ import annotations

from lightning.pytorch import Callback

from finetune.callbacks.media import _wandb_logger, say_where_pictures_go


class WandbEmbeddingLogger(Callback):
    """Each validation: the verification ROC curve, and up to `max_points` held-out embeddings
    as a table (W&B's projector plots a table with an embedding column in 2-D). Without a
    WandbLogger it says so once (RunReport has the ROC)."""

    def __init__(self, max_points: int = 1000):
        self.max_points = max_points

    def setup(self, trainer, pl_module, stage: str) -> None:
        say_where_pictures_go(self, trainer)

    def on_validation_end(self, trainer, pl_module):
        logger = _wandb_logger(trainer)
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero or pl_module.roc is None:
            return
        import wandb

        fpr, tpr, _ = pl_module.roc
        step = max(1, len(fpr) // 500)  # a few hundred points draw the same curve
        roc = wandb.Table(columns=["FAR", "TAR"], data=[[float(f), float(t)] for f, t in zip(fpr[::step], tpr[::step])])
        names = trainer.datamodule.val_identity_names
        embeddings, labels = pl_module.val_embeddings[: self.max_points], pl_module.val_labels[: self.max_points]
        table = wandb.Table(
            columns=["identity", "embedding"],
            data=[[names[int(label)], emb.tolist()] for emb, label in zip(embeddings, labels)],
        )
        logger.experiment.log({
            "val/roc": wandb.plot.line(roc, "FAR", "TAR", title="Open-set verification ROC"),
            "val/embeddings": table,
            "trainer/global_step": trainer.global_step,
        })
