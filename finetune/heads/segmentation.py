"""DeepLabV3 head (ASPP) and the auxiliary FCN head, sized from the backbone's feature_info."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Atrous rates that cover the same context at either output stride (DeepLabV3 paper, sec. 4.1):
# doubling the feature resolution doubles the rates (smp #390, torchvision #7956).
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global context branch. No BatchNorm on its 1x1 map: with a per-device batch of 1 a
    BatchNorm over one value per channel cannot train (torchvision's ASPPPooling fails there)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[-2], x.shape[-1])
        if x.is_contiguous(memory_format=torch.channels_last):
            # ASPP's torch.cat returns NCHW if any input is not channels_last, and an expanded
            # (zero-stride) map never is: the next conv would convert the whole concatenation back.
            return pooled.contiguous(memory_format=torch.channels_last)
        return pooled


class ASPP(nn.Module):
    def __init__(self, in_channels: int, rates: tuple[int, ...], out_channels: int = 256, dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels)]
            + [conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
            + [ImagePooling(in_channels, out_channels)]
        )
        self.project = nn.Sequential(conv_bn_relu(len(self.branches) * out_channels, out_channels), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Head(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...], channels: int = 256, dropout: float = 0.5):
        super().__init__(
            ASPP(in_channels, rates, channels, dropout),
            conv_bn_relu(channels, channels, 3),
            nn.Conv2d(channels, num_classes, 1),
        )


class FCNHead(nn.Sequential):
    """Auxiliary head on the stride-16 features (torchvision's recipe): deep supervision."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(conv_bn_relu(in_channels, in_channels // 4, 3), nn.Dropout(0.1), nn.Conv2d(in_channels // 4, num_classes, 1))
