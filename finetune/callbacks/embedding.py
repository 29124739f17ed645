"""Embedding outputs: W&B ROC curve and projector table; `predict` writes embeddings + FAISS index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.callbacks.media import _wandb_logger
from finetune.callbacks.outputs import write_embeddings


class WandbEmbeddingLogger(Callback):
    """Each validation: the verification ROC curve, and up to `max_points` held-out embeddings
    as a table (W&B's projector plots a table with an embedding column in 2-D)."""

    def __init__(self, max_points: int = 1000):
        self.max_points = max_points

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


class EmbeddingWriter(BasePredictionWriter):
    """`finetune predict`: `<output_dir>/embeddings.npy` (float32, unit norm, one row per image),
    `embeddings.csv` (row, path, identity = the image's folder name) and `index.faiss`
    (inner product = cosine), which `finetune search` queries."""

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        if not predictions or "embedding" not in predictions[0]:  # another task's predictions
            return
        if trainer.world_size > 1:
            raise RuntimeError("finetune predict for embeddings runs on one device; set --trainer.devices 1")
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "embeddings")
        embeddings = np.concatenate([p["embedding"].float().cpu().numpy() for p in predictions]).astype(np.float32)
        paths = [path for p in predictions for path in p["path"]]
        write_embeddings(out, embeddings, paths)
        print(f"{len(paths)} embeddings and a FAISS index written to {out}")
