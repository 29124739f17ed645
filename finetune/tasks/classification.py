"""Image classification: finetune.models.Classifier trained with cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.finetuning import FinetuningConfig
from finetune.models import Classifier
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask


def _summary_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # compute_groups merges metrics whose states look alike after the first batch; top-5
    # accuracy and macro F1 have same-shaped states and got merged (F1 came out as top-5).
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class ClassificationTask(FinetuneTask):
    """Everything is a plain value so a checkpoint rebuilds the model without the config.

    `num_classes`, `class_names` and `preprocessing` are linked from the DataModule by the CLI.
    """

    contract = TaskContract(
        name="classification",
        network=Classifier,
        outputs={
            "logits": "float32 [N, classes]",
            "probabilities": "float32 [N, classes]: softmax of the logits",
        },
        writer="csv",
        monitor="val/acc",
    )

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: Pretrained = True,
        weights: str | None = None,
        class_names: list[str] | None = None,
        pool: str = "avg",
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        finetuning: FinetuningConfig | None = None,
        preprocessing: dict | None = None,
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.net = Classifier.from_hparams(self.hparams)
        self.setup_finetuning(finetuning)
        self.val_metrics = _summary_metrics(num_classes, "val/")
        self.test_metrics = _summary_metrics(num_classes, "test/")
        # Torchmetrics, not self.log(value, batch_size=n): a rank whose batch is all DDP
        # padding updates nothing and still joins the epoch-end sync ("disable": no NaN check,
        # which would read the value on the host).
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.val_per_class = MulticlassAccuracy(num_classes, average=None)
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.confusion_matrix: torch.Tensor | None = None  # last validation's, for loggers

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["label"])
        # Top-1 of the batch by hand: a torchmetrics update validates labels with a host sync.
        acc = (logits.argmax(dim=1) == batch["label"]).float().mean()
        self.log_training(len(logits), loss=loss, acc=acc)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        self.update_metrics(logits, batch["label"], self.val_loss, self.val_metrics, self.val_per_class, self.val_confusion)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log_dict(self.val_metrics, prog_bar=True)
        return logits.argmax(dim=1)  # for callbacks that show predictions

    def on_validation_epoch_end(self) -> None:
        per_class = self.val_per_class.compute()
        self.log_per_class("val/acc_class", per_class)
        self.confusion_matrix = self.val_confusion.compute().cpu()
        self.reset_metrics(self.val_per_class, self.val_confusion)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.update_metrics(self(batch["image"]), batch["label"], self.test_loss, self.test_metrics)
        self.log("test/loss", self.test_loss)
        self.log_dict(self.test_metrics)
