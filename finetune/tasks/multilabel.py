"""Multi-label classification: any number of labels per image, a sigmoid each
(finetune.models.MultiLabelClassifier), trained with binary cross-entropy or the asymmetric loss."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel
from torchmetrics import MeanMetric

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.finetuning import FinetuningConfig
from finetune.metrics.multilabel import MultiLabelMetrics
from finetune.models import MultiLabelClassifier
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask
from finetune.tasks.mixing import BatchMixing
from finetune.value_checks import check_value

log = logging.getLogger(__name__)


def decision_thresholds(hparams: dict) -> list[float]:
    """One threshold per label: `threshold` as set (one number for all, or a list), or as tuned."""
    threshold, num_labels = hparams.get("threshold", 0.5), hparams["num_classes"]
    return [float(t) for t in threshold] if isinstance(threshold, (list, tuple)) else [float(threshold)] * num_labels


def multilabel_metadata(hparams: dict, data: dict) -> dict:
    """Exported files carry the decision thresholds: `predict --exported` lists the same labels."""
    return {"thresholds": decision_thresholds(hparams)}


def negatives_per_positive(positives: list[int], images: int) -> list[float]:
    """BCE `pos_weight` for `auto`: negatives / positives of each label in the training split, so
    a rare label's few positives weigh as much as its many negatives (1 for a label without
    positives, which never appears in the loss as a positive anyway)."""
    return [(images - n) / n if n else 1.0 for n in positives]


class MultiLabelClassificationTask(FinetuneTask):
    """Everything is a plain value so a checkpoint rebuilds the model without the config.

    `num_classes` (the labels), `class_names` and `preprocessing` are linked from the
    DataModule by the CLI (finetune.data.ManifestDataModule gives multi-hot labels).

    - `loss`: "bce" (binary cross-entropy with logits) or "asl" (the asymmetric loss of
      Ridnik et al. 2021, timm's AsymmetricLossMultiLabel with `asl_gamma_neg`,
      `asl_gamma_pos`, `asl_clip`; averaged over images and labels like BCE, so one LR suits
      both). `pos_weight`: BCE's weight of each label's positives, a list or `auto`
      (negatives / positives in the training split, for rare labels).
    - `label_smoothing`: targets move towards 0.5 by this share.
    - `threshold`: a label is predicted when its probability reaches it; one number, or one
      per label. `tune_thresholds`: after each validation, each label's threshold becomes the
      one with the best F1 on that validation (0.01 steps); they are saved in the checkpoint's
      hyperparameters, so `finetune predict`, export and `predict --exported` use them. They
      are tuned on the validation split itself, so `val/f1` at them is optimistic: judge a
      model by `val/map`, which no threshold affects (the checkpoint's monitor).
    - The recipe's parts work as for ClassificationTask: `lr: auto`, `mixup` / `cutmix` (on
      the multi-hot targets), `tta_flip` / `tta_scales` (averaged sigmoid probabilities).
    """

    contract = TaskContract(
        name="multilabel_classification",
        network=MultiLabelClassifier,
        outputs={
            "logits": "float32 [N, labels] (with test-time augmentation: logit of the averaged probabilities)",
            "probabilities": "float32 [N, labels]: sigmoid of the logits, one per label (they need not sum to 1)",
        },
        writer="labels_csv",
        monitor="val/map",
        metadata=multilabel_metadata,
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
        loss: Literal["bce", "asl"] = "bce",
        pos_weight: list[float] | Literal["auto"] | None = None,
        asl_gamma_neg: float = 4.0,
        asl_gamma_pos: float = 1.0,
        asl_clip: float = 0.05,
        label_smoothing: float = 0.0,
        threshold: float | list[float] = 0.5,
        tune_thresholds: bool = False,
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
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        for key in ("label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_off_epochs"):
            check_value(f"model.{key}", self.hparams[key])
        thresholds = decision_thresholds(self.hparams)
        if len(thresholds) != num_classes or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(
                f"model.threshold: {threshold!r}; pass one probability from 0 to 1 (e.g. 0.5), or one per label "
                f"({num_classes})"
            )
        if isinstance(pos_weight, list) and len(pos_weight) != num_classes:
            raise ValueError(f"model.pos_weight: {len(pos_weight)} weights for {num_classes} labels; pass one a label, or auto")
        self.net = MultiLabelClassifier.from_hparams(self.hparams)
        self.setup_finetuning(finetuning)
        # Smoothing is applied to the (mixed) multi-hot targets in _loss, the binary way.
        self.mixing = (
            BatchMixing(num_classes, mixup, cutmix, mixup_prob, mixup_switch_prob, 0.0, mixup_off_epochs)
            if mixup or cutmix else None
        )
        self.asl = AsymmetricLossMultiLabel(asl_gamma_neg, asl_gamma_pos, asl_clip, reduction="mean") if loss == "asl" else None
        # Set in setup() (`auto` needs the data); the loss's, not the model's: not in checkpoints.
        self.register_buffer("loss_pos_weight", None, persistent=False)
        self.val_metrics = MultiLabelMetrics(num_classes, tune=tune_thresholds)
        self.test_metrics = MultiLabelMetrics(num_classes)
        self.set_thresholds(thresholds)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.per_label: dict[str, list] | None = None  # last validation's per-label table, for loggers

    @property
    def decision_thresholds(self) -> list[float]:
        return decision_thresholds(self.hparams)

    def set_thresholds(self, thresholds: list[float]) -> None:
        """The decision thresholds evaluation and prediction use, kept in the hyperparameters
        (so in every checkpoint and exported file) as plain floats."""
        self.hparams["threshold"] = [round(float(t), 4) for t in thresholds]
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.thresholds.copy_(torch.tensor(self.hparams["threshold"]))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        weights = self.hparams.get("pos_weight")
        if weights is not None and stage == "fit":
            if weights == "auto":
                weights = negatives_per_positive(*_label_counts(self.trainer.datamodule))
                log.info("pos_weight (negatives per positive): %s", ", ".join(f"{w:.3g}" for w in weights))
            self.loss_pos_weight = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        if self.hparams.label_smoothing:
            targets = targets * (1.0 - self.hparams.label_smoothing) + 0.5 * self.hparams.label_smoothing
        if self.asl is not None:
            return self.asl(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.loss_pos_weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if self.mixing is not None and self.mixing.active(self.current_epoch, self.trainer.max_epochs):
            images, targets = self.mixing(images, targets, self.global_step, self.global_rank)
        logits = self(images)
        loss = self._loss(logits, targets)
        # Per-label agreement at 0.5 by hand (a torchmetrics update would sync with the host);
        # under mixup, against each target's rounded share.
        acc = ((logits >= 0) == (targets >= 0.5)).float().mean()
        self.log_training(len(logits), loss=loss, label_acc=acc)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net.evaluation_logits(batch["image"])
        self.update_metrics(logits, batch["label"], self.val_loss, self.val_metrics)
        self.log("val/loss", self.val_loss, prog_bar=True)
        return logits.sigmoid() >= self.val_metrics.thresholds  # the predicted label sets, for callbacks

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_metrics, prog_bar=True)
        if self.val_metrics.curve is not None and not self.trainer.sanity_checking:
            thresholds, best_f1 = self.val_metrics.best_thresholds()
            self.set_thresholds(thresholds.tolist())
            present = self._last_positives > 0
            self.log("val/f1_tuned", best_f1[present].mean() if bool(present.any()) else best_f1.new_zeros(()),
                     sync_dist=True)
            self.per_label["threshold"] = self.hparams["threshold"]
        self.reset_metrics(self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.update_metrics(self.net.evaluation_logits(batch["image"]), batch["label"], self.test_loss, self.test_metrics)
        self.log("test/loss", self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_metrics)
        self.reset_metrics(self.test_metrics)

    def _log_evaluation(self, split: str, metrics: MultiLabelMetrics, prog_bar: bool = False) -> None:
        """`<split>/map`, `map_micro`, `f1`, `f1_micro`, `exact_match`; per-label AP and F1
        (`<split>/ap_class/<label>`, up to MAX_PER_CLASS_SCALARS) and, for validation, the
        per-label table loggers show. Values are synced across ranks by torchmetrics already."""
        values = metrics.compute()
        for name in ("map", "map_micro", "f1", "f1_micro", "exact_match"):
            self.log(f"{split}/{name}", values[name], prog_bar=prog_bar and name in ("map", "f1"), sync_dist=True)
        self.log_per_class(f"{split}/ap_class", values["ap"])
        self.log_per_class(f"{split}/f1_class", values["f1_class"])
        self._last_positives = values["positives"]
        if split == "val":
            self.per_label = {
                "label": self.class_names,
                "ap": values["ap"].tolist(),
                "f1": values["f1_class"].tolist(),
                "positives": [int(n) for n in values["positives"].tolist()],
                "threshold": list(self.hparams["threshold"]),
            }


def _label_counts(datamodule) -> tuple[list[int], int]:
    counts = getattr(datamodule, "label_counts", None)
    if counts is None:
        raise ValueError(
            f"model.pos_weight: auto needs the training images per label, which {type(datamodule).__name__} does not "
            "give; pass a list of weights instead"
        )
    return list(counts), len(datamodule.splits.train)
