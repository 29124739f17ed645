"""A fourth task, added the way the README's layout section says a new task is added: this task
module (its network, its contract, its training), one config (one_vs_rest.yaml) and one test
file (test_one_vs_rest.py). Nothing in finetune/ knows it: the CLI, export, the exported-file
runner and the prediction files all go through its contract.

One-vs-rest classification: a sigmoid per class, trained with binary cross-entropy on one-hot
labels, so the probabilities need not sum to 1 (the shape multi-label classification takes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.finetuning import FinetuningConfig
from finetune.models import Classifier
from finetune.tasks.base import FinetuneTask


class OneVsRestNet(Classifier):
    """The classifier network with a sigmoid per class instead of a softmax over them."""

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(images)
        return {"logits": logits, "probabilities": logits.sigmoid()}


class OneVsRestTask(FinetuneTask):
    contract = TaskContract(
        name="one_vs_rest",
        network=OneVsRestNet,
        outputs={"logits": "float32 [N, classes]", "probabilities": "float32 [N, classes]: sigmoid of each logit"},
        writer="csv",  # path, best class, its probability, top-k: the classification CSV fits
        monitor="val/loss",  # not the CLI's classification default: the test checks it is read
        mode="min",
    )

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: Pretrained = False,
        weights: str | None = None,
        class_names: list[str] | None = None,
        pool: str = "avg",
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        finetuning: FinetuningConfig | None = None,
        preprocessing: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = OneVsRestNet.from_hparams(self.hparams)
        self.setup_finetuning(finetuning)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch["image"]), batch["label"])
        self.log_training(len(batch["label"]), loss=loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.update_metrics(self(batch["image"]), batch["label"], self.val_loss, self.val_acc)
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc)
