"""Identity embeddings: backbone -> neck -> L2-normalised embedding, trained with a margin head,
validated open-set (verification and retrieval on identities unseen in training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.finetuning import FinetuningConfig
from finetune.heads.embedding import MarginHead, MarginKind, as_class_indices
from finetune.metrics.embedding import (
    balanced_pairs,
    read_lfw_pairs,
    retrieval_metrics,
    roc_curve,
    verification_metrics,
)
from finetune.models import EmbeddingNet
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask


def _rows(row_of: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Dataset indices -> rows of the gathered embeddings; -1 for images not evaluated."""
    rows = torch.full_like(indices, -1)
    known = indices < len(row_of)
    rows[known] = row_of[indices[known]]
    return rows


def embedding_metadata(hparams: dict, data: dict) -> dict:
    return {"embedding_dim": hparams["embedding_dim"]}


class EmbeddingTask(FinetuneTask):
    """finetune.models.EmbeddingNet trained through a margin head (`self.head`, ArcFace-family),
    which only training uses. `num_classes` is the number of training identities (linked from
    the data by the CLI); the margin head's weight matrix has one row per identity (per sub-centre)."""

    contract = TaskContract(
        name="embedding",
        network=EmbeddingNet,
        outputs={"embedding": "float32 [N, D]: L2-normalised (cosine similarity is a dot product)"},
        writer="embeddings",
        monitor="val/tar@far=1e-2",
        metadata=embedding_metadata,
    )

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: Pretrained = True,
        weights: str | None = None,
        class_names: list[str] | None = None,
        embedding_dim: int = 512,
        dropout: float = 0.0,
        margin_head: MarginKind = "arcface",
        logit_scale: float = 64.0,
        margin: float | None = None,
        subcenters: int = 3,
        val_pairs: int = 6000,
        val_pairs_seed: int = 0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        finetuning: FinetuningConfig | None = None,
        preprocessing: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = EmbeddingNet.from_hparams(self.hparams)
        self.head = MarginHead(embedding_dim, num_classes, margin_head, logit_scale, margin, subcenters)
        self.setup_finetuning(finetuning)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val_embeddings: torch.Tensor | None = None  # last validation's, for loggers
        self.val_labels: torch.Tensor | None = None
        self.roc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = as_class_indices(batch["label"])
        logits = self.head(self.net.embed_unnormalised(batch["image"]), labels)
        loss = F.cross_entropy(logits, labels)
        # Accuracy with the margin in the target logit: a lower bound of the nearest-centre accuracy.
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log_training(len(labels), loss=loss, acc=acc)
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_outputs = []  # de-duplicated by dataset index at the end: DDP padding included

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_outputs.append((self(batch["image"]), batch["label"], batch["index"]))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if not outputs or self.trainer.sanity_checking:  # two batches say nothing about open-set metrics
            return
        embeddings, labels, indices = (torch.cat(parts) for parts in zip(*outputs))
        if self.trainer.world_size > 1:  # each rank saw a shard (padded): gather, order by index
            embeddings, labels, indices = (self.all_gather(t).flatten(0, 1) for t in (embeddings, labels, indices))
        # Rows in dataset order; padding duplicates collapse, and limit_val_batches may leave gaps.
        position = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long, device=indices.device)
        position[indices] = torch.arange(len(indices), device=indices.device)
        present = torch.nonzero(position >= 0).squeeze(1)
        embeddings, labels = embeddings[position[present]].float(), labels[position[present]]
        # O(N^2 D): on the embeddings' device, each rank ranking its share of the queries.
        metrics = retrieval_metrics(embeddings, labels, distributed=True)
        embeddings, labels = embeddings.cpu(), labels.cpu()
        row_of = torch.full((len(position),), -1, dtype=torch.long)
        row_of[present.cpu()] = torch.arange(len(present))
        first, second, same, folds = self._pairs(labels, row_of)
        scores = (embeddings[first] * embeddings[second]).sum(dim=1)
        metrics.update(verification_metrics(scores, same, folds))
        self.roc = roc_curve(scores, same)
        self.val_embeddings, self.val_labels = embeddings, labels
        # Every rank holds the same numbers: retrieval all-reduced, verification from the same gathered tensors.
        self.log_dict({f"val/{name}": value for name, value in metrics.items()})

    def _pairs(self, labels: torch.Tensor, row_of: torch.Tensor):
        """Pairs from the data's LFW pairs file (dataset indices mapped to the rows we have),
        or seeded balanced pairs."""
        datamodule = self.trainer.datamodule
        pairs_path = getattr(datamodule, "pairs_path", None)
        if pairs_path is None:
            first, second, same = balanced_pairs(labels, self.hparams.val_pairs, self.hparams.val_pairs_seed)
            return first, second, same, None
        first, second, same, folds = read_lfw_pairs(pairs_path, datamodule.val_index_of())
        first, second = _rows(row_of, first), _rows(row_of, second)
        keep = (first >= 0) & (second >= 0)
        return first[keep], second[keep], same[keep], None if folds is None else folds[keep]
