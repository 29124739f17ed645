"""Image classification: finetune.models.Classifier trained with cross-entropy."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.errors import FinetuneError
from finetune.finetuning import FinetuningConfig
from finetune.models import Classifier
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask
from finetune.tasks.mixing import BatchMixing
from finetune.value_checks import check_value

log = logging.getLogger(__name__)


def _summary_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        # The mean of per-class recalls: what accuracy would be on a balanced validation set.
        "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # compute_groups merges metrics whose states look alike after the first batch; top-5
    # accuracy and macro F1 have same-shaped states and got merged (F1 came out as top-5).
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def inverse_frequency_weights(counts: list[int]) -> list[float]:
    """n / (classes * count) per class (scikit-learn's "balanced"): weight 1 when all are equal;
    a class with no training image gets 0 (it never appears in the loss anyway)."""
    total, present = sum(counts), sum(1 for c in counts if c)
    return [total / (present * c) if c else 0.0 for c in counts]


def _class_counts(datamodule) -> list[int]:
    counts = getattr(datamodule, "class_counts", None)
    if counts is None:
        raise ValueError(
            f"model.class_weights: auto needs the training images per class, which {type(datamodule).__name__} "
            "does not give; pass a list of weights instead"
        )
    return list(counts)


class ClassificationTask(FinetuneTask):
    """Everything is a plain value so a checkpoint rebuilds the model without the config.

    `num_classes`, `class_names` and `preprocessing` are linked from the DataModule by the CLI.

    The recipe's parts beyond the schedule (README: "A recipe that wins"):
    `lr: auto` runs Lightning's LR range test before training and trains at its suggestion
    (finetune/callbacks/lr_auto.py). `mixup` / `cutmix`: Beta alphas of Mixup and CutMix on
    the device batch (0: off; finetune/tasks/mixing.py), with `mixup_prob`, `mixup_switch_prob`
    (CutMix's share when both are on) and `mixup_off_epochs` (plain batches for the last N
    epochs, as timm's `--mixup-off-epoch`). `class_weights`: per-class loss weights, or `auto`
    for inverse class frequency in the training split. `tta_flip` / `tta_scales`: validation,
    test, predict and export average the probabilities over mirrored / rescaled views.
    """

    contract = TaskContract(
        name="classification",
        network=Classifier,
        outputs={
            "logits": "float32 [N, classes] (with test-time augmentation: log of the averaged probabilities)",
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
        lr: float | Literal["auto"] = 1e-3,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        finetuning: FinetuningConfig | None = None,
        preprocessing: dict | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_off_epochs: int = 0,
        class_weights: list[float] | Literal["auto"] | None = None,
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.net = Classifier.from_hparams(self.hparams)
        self.setup_finetuning(finetuning)
        for key in ("label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_off_epochs"):
            check_value(f"model.{key}", self.hparams[key])  # also when built in Python, not by the CLI
        self.mixing = (
            BatchMixing(num_classes, mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing, mixup_off_epochs)
            if mixup or cutmix else None
        )
        if isinstance(class_weights, list) and len(class_weights) != num_classes:
            raise ValueError(
                f"model.class_weights: {len(class_weights)} weights for {num_classes} classes; pass one a class, or auto"
            )
        # Set in setup() (`auto` needs the data); not saved in checkpoints: the loss, not the model.
        self.register_buffer("loss_weights", None, persistent=False)
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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(self.trainer.datamodule, "multilabel", False):
            raise FinetuneError(
                f"model.class_path: {type(self.trainer.datamodule).__name__} gives several labels per image; "
                "use finetune.tasks.MultiLabelClassificationTask (one class per image: set data.multilabel false)"
            )
        weights = self.hparams.get("class_weights")
        if weights is not None and stage == "fit":
            if weights == "auto":
                weights = inverse_frequency_weights(_class_counts(self.trainer.datamodule))
                log.info("class weights (inverse frequency): %s", ", ".join(f"{w:.3g}" for w in weights))
            self.loss_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices (with label smoothing) or against probabilities
        (mixed targets, smoothing already in them), weighted per class when set."""
        smoothing = self.hparams.label_smoothing if labels.dim() == 1 else 0.0
        return F.cross_entropy(logits, labels, weight=self.loss_weights, label_smoothing=smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if self.mixing is not None and self.mixing.active(self.current_epoch, self.trainer.max_epochs):
            images, targets = self.mixing(images, targets, self.global_step, self.global_rank)
        logits = self(images)
        loss = self._loss(logits, targets)
        # Top-1 of the batch by hand: a torchmetrics update validates labels with a host sync.
        # Under mixup, against each mixed target's larger share: the only honest label it has.
        labels = targets if targets.dim() == 1 else targets.argmax(dim=1)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log_training(len(logits), loss=loss, acc=acc)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net.evaluation_logits(batch["image"])
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
        self.update_metrics(self.net.evaluation_logits(batch["image"]), batch["label"], self.test_loss, self.test_metrics)
        self.log("test/loss", self.test_loss)
        self.log_dict(self.test_metrics)
