"""Test-time augmentation: class probabilities averaged over flipped and rescaled views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor


def average_over_views(
    probabilities: Callable[[Tensor], Tensor], images: Tensor, flip: bool, scales: Sequence[float], dense: bool
) -> Tensor:
    """Mean of `probabilities(view)` over the views: each scale in `scales`, each also mirrored
    left-right when `flip`. `dense` outputs ([N, C, h, w] maps) are mirrored back and resized to
    the input's size before averaging; per-image outputs ([N, C]) are averaged as they are.

    Probabilities, not logits, are averaged: the mean of softmaxes is a proper distribution
    (what timm's and torchvision's evaluation scripts average as well)."""
    size = images.shape[-2:]
    total: Tensor | float = 0.0
    views = 0
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            probs = probabilities(scaled.flip(-1) if mirrored else scaled)
            if dense:
                probs = probs.flip(-1) if mirrored else probs
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            total = total + probs
            views += 1
    return total / views
