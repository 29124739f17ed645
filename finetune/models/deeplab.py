"""DeepLabV3 on a dilated timm ResNet (output stride 8 or 16), as in torchvision's recipe: ASPP
on the last stage and an optional FCN auxiliary head on layer3 for deep supervision.

Channel widths come from timm's feature_info, so resnet18 (512) and resnet50 (2048) both work.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from finetune.backbones import Pretrained, create_backbone
from finetune.heads.segmentation import ATROUS_RATES, DeepLabV3Head, FCNHead
from finetune.models.tta import average_over_views


class DeepLabV3(nn.Module):
    """`aux_head`: build the auxiliary head (training only: eval and export never run it).
    `tta_flip` / `tta_scales`: test-time flips and scales that `probabilities` averages over."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: Pretrained = False,
        weights: str | None = None,
        output_stride: int = 16,
        atrous_rates: tuple[int, int, int] | None = None,
        aspp_channels: int = 256,
        aspp_dropout: float = 0.5,
        aux_head: bool = True,
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
    ):
        super().__init__()
        if output_stride not in ATROUS_RATES:
            raise ValueError(f"model.output_stride: {output_stride} is not 8 or 16")
        self.output_stride = output_stride
        self.tta_flip = tta_flip
        self.tta_scales = list(tta_scales or [1.0])
        # layer3 (index 3) feeds the auxiliary head, layer4 (index 4) the ASPP.
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, weights=weights, features_only=True,
            output_stride=output_stride, out_indices=(3, 4),
        )
        aux_channels, channels = self.backbone.feature_info.channels()
        rates = tuple(atrous_rates or ATROUS_RATES[output_stride])
        self.head = DeepLabV3Head(channels, num_classes, rates, aspp_channels, aspp_dropout)
        self.aux_head = FCNHead(aux_channels, num_classes) if aux_head else None

    @classmethod
    def from_hparams(cls, hp) -> DeepLabV3:
        return cls(
            hp["backbone"], hp["num_classes"], hp["pretrained"], hp["weights"], hp["output_stride"], hp["atrous_rates"],
            hp["aspp_channels"], hp["aspp_dropout"], hp["aux_loss_weight"] > 0, hp["tta_flip"], hp["tta_scales"],
        )

    def check_input(self, images: Tensor) -> None:
        height, width = images.shape[-2:]
        stride = self.output_stride
        if min(height, width) < stride:
            raise ValueError(
                f"input {height}x{width} is smaller than the output stride {stride}: the features would be "
                f"empty or 1x1; use images (or data.crop_size) of at least {4 * stride} px"
            )

    def forward_with_aux(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits at the input's size, and in training the auxiliary head's (else None)."""
        self.check_input(images)
        mid, last = self.backbone(images)
        size = images.shape[-2:]
        logits = F.interpolate(self.head(last), size=size, mode="bilinear", align_corners=False)
        if self.aux_head is None or not self.training:
            return logits, None
        return logits, F.interpolate(self.aux_head(mid), size=size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_with_aux(images)[0]

    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities at the input's size, averaged over the test-time flips and scales."""
        return average_over_views(lambda view: self(view).softmax(dim=1), images, self.tta_flip, self.tta_scales, dense=True)

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        probs = self.probabilities(images)
        return {"mask": probs.argmax(dim=1), "probabilities": probs}
