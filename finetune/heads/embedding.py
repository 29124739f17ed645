"""Embedding neck and margin heads (ArcFace, CosFace, Sub-center ArcFace).

As in insightface's arcface_torch: the margin head owns its weight matrix (one row per
training identity), so it trains in the task's one optimizer and lives in its checkpoint;
the margins are small pure functions of cos(theta), checked against hand-computed values.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MarginKind = Literal["arcface", "cosface", "subcenter_arcface"]
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35, "subcenter_arcface": 0.5}
_EPS = 1e-7


def arcface_target(cos: Tensor, m: float) -> Tensor:
    """cos(theta + m) for the target class, kept monotonic in theta past pi - m.

    Where theta + m would exceed pi, cos(theta + m) would rise again and reward a worse angle;
    insightface falls back to cos(theta) - m*sin(m) there (a linear continuation).
    """
    cos = cos.clamp(-1 + _EPS, 1 - _EPS)  # d/dcos sqrt(1 - cos^2) is infinite at +-1 (theta 0 or pi)
    sin = torch.sqrt(1.0 - cos * cos)
    with_margin = cos * math.cos(m) - sin * math.sin(m)
    return torch.where(cos > math.cos(math.pi - m), with_margin, cos - math.sin(math.pi - m) * m)


def cosface_target(cos: Tensor, m: float) -> Tensor:
    return cos - m


def as_class_indices(labels: Tensor) -> Tensor:
    """Labels as int64. Float or int32 labels otherwise index or compare wrongly and the loss
    sits at ln(num_classes) (insightface #1437); a non-integer label is an error."""
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("identity labels must be whole numbers (class indices), got fractional values")
    return labels.long()


class EmbeddingNeck(nn.Module):
    """Pool -> BN -> Dropout -> FC -> BN: insightface's embedding layer, but pooled so any
    input size works (insightface flattens a fixed 7x7 map)."""

    def __init__(self, in_channels: int, embedding_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.layers = nn.Sequential(
            nn.BatchNorm1d(in_channels), nn.Dropout(dropout), nn.Linear(in_channels, embedding_dim), nn.BatchNorm1d(embedding_dim)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(self.pool(features).flatten(1))


class MarginHead(nn.Module):
    """s * cos(theta) logits over the training identities, with the margin on the target class."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        kind: MarginKind = "arcface",
        scale: float = 64.0,
        margin: float | None = None,
        subcenters: int = 3,
    ):
        super().__init__()
        self.kind = kind
        self.scale = scale
        self.margin = DEFAULT_MARGIN[kind] if margin is None else margin
        self.subcenters = subcenters if kind == "subcenter_arcface" else 1
        self.weight = nn.Parameter(torch.empty(num_classes * self.subcenters, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: Tensor) -> Tensor:
        # fp32 even under bf16 autocast: cos near +-1 and the scale s = 64 need the mantissa.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        if self.subcenters > 1:  # each identity is its nearest sub-centre (robust to label noise)
            cos = cos.view(len(cos), -1, self.subcenters).amax(dim=2)
        return cos

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        labels = as_class_indices(labels)
        target = cos.gather(1, labels[:, None])
        margined = cosface_target(target, self.margin) if self.kind == "cosface" else arcface_target(target, self.margin)
        return self.scale * cos.scatter(1, labels[:, None], margined)
