"""Semantic segmentation: finetune.models.DeepLabV3 (dilated timm ResNet, output stride 8 or 16,
ASPP head, auxiliary FCN head) trained with cross-entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from finetune.backbones import Pretrained
from finetune.contract import TaskContract
from finetune.data.segmentation_classes import default_palette, read_class_list
from finetune.finetuning import FinetuningConfig
from finetune.models import DeepLabV3
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask


def segmentation_metadata(hparams: dict, data: dict) -> dict:
    """Exported files carry the class colours (the data's classes.yaml when the data is still
    where it was, else the default palette) and the smallest input side (the output stride)."""
    try:
        palette = read_class_list(Path(data["root"]).expanduser(), data.get("class_names"))[1]
    except (KeyError, TypeError, OSError, ValueError):
        palette = default_palette(hparams["num_classes"])
    return {"palette": [list(c) for c in palette], "min_input_size": output_stride(hparams)}


def output_stride(hparams: dict) -> int:
    return hparams["output_stride"]


class SegmentationTask(FinetuneTask):
    """DeepLabV3 as in torchvision's recipe: loss = out + aux_loss_weight * aux (the auxiliary
    head exists when aux_loss_weight > 0), poly LR, ignore_index 255."""

    contract = TaskContract(
        name="segmentation",
        network=DeepLabV3,
        outputs={
            "mask": "int64 [N, H, W]: class index per pixel, at the input's size",
            "probabilities": "float32 [N, classes, H, W]: class probabilities, upsampled to the input's size",
        },
        writer="masks",
        monitor="val/miou",
        full_resolution=True,
        min_input_size=output_stride,
        metadata=segmentation_metadata,
    )

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: Pretrained = True,
        weights: str | None = None,
        class_names: list[str] | None = None,
        output_stride: Literal[8, 16] = 16,
        atrous_rates: tuple[int, int, int] | None = None,
        aspp_channels: int = 256,
        aspp_dropout: float = 0.5,
        aux_loss_weight: float = 0.4,
        ignore_index: int = 255,
        class_weights: list[float] | None = None,
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: SchedulerName = "poly",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        finetuning: FinetuningConfig | None = None,
        preprocessing: dict | None = None,
    ):
        super().__init__()
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"model.class_weights has {len(class_weights)} values for num_classes={num_classes}")
        self.save_hyperparameters()
        self.net = DeepLabV3.from_hparams(self.hparams)
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float) if class_weights else None)
        self.setup_finetuning(finetuning)
        metric_args = dict(num_classes=num_classes, ignore_index=ignore_index)
        self.val_miou = MulticlassJaccardIndex(**metric_args, average="macro")
        self.val_iou = MulticlassJaccardIndex(**metric_args, average=None)
        self.val_pixel_acc = MulticlassAccuracy(**metric_args, average="micro")
        self.test_miou = MulticlassJaccardIndex(**metric_args, average="macro")
        self.test_pixel_acc = MulticlassAccuracy(**metric_args, average="micro")
        # Image-weighted means of the per-batch loss, as torchmetrics: see ClassificationTask.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.per_class_iou: torch.Tensor | None = None  # last validation's, for loggers

    def on_fit_start(self) -> None:
        data_ignore = getattr(self.trainer.datamodule, "ignore_index", self.hparams.ignore_index)
        if data_ignore != self.hparams.ignore_index:
            raise ValueError(
                f"model.ignore_index ({self.hparams.ignore_index}) differs from data.ignore_index ({data_ignore}); set both alike"
            )

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, aux = self.net.forward_with_aux(batch["image"])
        loss = self._loss(logits, batch["mask"])
        if aux is not None:
            loss = loss + self.hparams.aux_loss_weight * self._loss(aux, batch["mask"])
        self.log_training(len(logits), loss=loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # log-probabilities: cross-entropy and argmax work on them as on logits, also after TTA.
        logits = self.net.probabilities(batch["image"]).clamp_min(1e-8).log()
        self.update_metrics(logits, batch["mask"], self.val_loss, self.val_miou, self.val_iou, self.val_pixel_acc)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/miou", self.val_miou, prog_bar=True)
        self.log("val/pixel_acc", self.val_pixel_acc)
        return logits.argmax(dim=1)  # for callbacks that show predictions

    def on_validation_epoch_end(self) -> None:
        self.per_class_iou = self.val_iou.compute().cpu()
        self.log_per_class("val/iou_class", self.per_class_iou)
        self.reset_metrics(self.val_iou)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.net.probabilities(batch["image"]).clamp_min(1e-8).log()
        self.update_metrics(logits, batch["mask"], self.test_loss, self.test_miou, self.test_pixel_acc)
        self.log("test/loss", self.test_loss)
        self.log("test/miou", self.test_miou)
        self.log("test/pixel_acc", self.test_pixel_acc)
