"""Classification head: global pool -> [hidden layer] -> dropout -> linear."""

from __future__ import annotations

from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn


class ClassificationHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: str = "avg",
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        # `pool` is any timm pool type; "catavgmax" doubles the width, so ask it for the size.
        self.pool = SelectAdaptivePool2d(pool_type=pool, flatten=True)
        width = in_channels * self.pool.feat_mult()
        layers: list[nn.Module] = []
        if hidden_dim:
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.classifier = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.pool(features))
