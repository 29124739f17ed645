"""Semantic segmentation: dilated timm ResNet (output stride 8 or 16) + DeepLabV3 (ASPP) head."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from finetune.backbones import Pretrained, create_backbone
from finetune.finetuning import FinetuningConfig
from finetune.heads.segmentation import ATROUS_RATES, DeepLabV3Head, FCNHead
from finetune.optim import OptimizerName, SchedulerName
from finetune.tasks.base import FinetuneTask


class SegmentationTask(FinetuneTask):
    """DeepLabV3 as in torchvision's recipe: ASPP on the last stage, an optional FCN auxiliary
    head on layer3 (loss = out + aux_loss_weight * aux), poly LR, ignore_index 255.

    Channel widths come from timm's feature_info, so resnet18 (512) and resnet50 (2048) both work.
    """

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
    ):
        super().__init__()
        if output_stride not in ATROUS_RATES:
            raise ValueError(f"model.output_stride: {output_stride} is not 8 or 16")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"model.class_weights has {len(class_weights)} values for num_classes={num_classes}")
        self.save_hyperparameters()
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        # layer3 (index 3) feeds the auxiliary head, layer4 (index 4) the ASPP.
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, weights=weights, features_only=True,
            output_stride=output_stride, out_indices=(3, 4),
        )
        aux_channels, channels = self.backbone.feature_info.channels()
        rates = tuple(atrous_rates or ATROUS_RATES[output_stride])
        self.head = DeepLabV3Head(channels, num_classes, rates, aspp_channels, aspp_dropout)
        self.aux_head = FCNHead(aux_channels, num_classes) if aux_loss_weight > 0 else None
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

    def check_input(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        stride = self.hparams.output_stride
        if min(height, width) < stride:
            raise ValueError(
                f"input {height}x{width} is smaller than the output stride {stride}: the features would be "
                f"empty or 1x1; use images (or data.crop_size) of at least {4 * stride} px"
            )

    def forward_with_aux(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_input(images)
        mid, last = self.backbone(images)
        size = images.shape[-2:]
        logits = F.interpolate(self.head(last), size=size, mode="bilinear", align_corners=False)
        if self.aux_head is None or not self.training:
            return logits, None
        return logits, F.interpolate(self.aux_head(mid), size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(images)[0]

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for validation, test and predict, averaged over the optional
        test-time flips (`tta_flip`) and scales (`tta_scales`, e.g. [0.75, 1.0, 1.25])."""
        size = images.shape[-2:]
        total = 0
        views = 0
        for scale in self.hparams.tta_scales or [1.0]:
            scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            for flip in (False, True) if self.hparams.tta_flip else (False,):
                view = scaled.flip(-1) if flip else scaled
                probs = self(view).softmax(dim=1)
                probs = probs.flip(-1) if flip else probs
                total = total + F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
                views += 1
        return total / views

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, aux = self.forward_with_aux(batch["image"])
        loss = self._loss(logits, batch["mask"])
        if aux is not None:
            loss = loss + self.hparams.aux_loss_weight * self._loss(aux, batch["mask"])
        self.log_training(len(logits), loss=loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # log-probabilities: cross-entropy and argmax work on them as on logits, also after TTA.
        logits = self.evaluate(batch["image"]).clamp_min(1e-8).log()
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
        logits = self.evaluate(batch["image"]).clamp_min(1e-8).log()
        self.update_metrics(logits, batch["mask"], self.test_loss, self.test_miou, self.test_pixel_acc)
        self.log("test/loss", self.test_loss)
        self.log("test/miou", self.test_miou)
        self.log("test/pixel_acc", self.test_pixel_acc)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"path": batch["path"], "mask": self.evaluate(batch["image"]).argmax(dim=1), "size": batch.get("size")}
