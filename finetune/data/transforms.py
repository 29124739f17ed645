"""albumentations pipelines whose size and normalisation default to the backbone's own."""

from __future__ import annotations

import math

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def train_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.25, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
) -> A.Compose:
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=tuple(scale), interpolation=_INTERPOLATION[interpolation]),
        A.HorizontalFlip(p=hflip),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])


def eval_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> A.Compose:
    # timm's eval recipe: resize the short side to size / crop_pct, then centre-crop.
    return A.Compose([
        A.SmallestMaxSize(max_size=math.floor(size / crop_pct), interpolation=_INTERPOLATION[interpolation]),
        A.CenterCrop(height=size, width=size),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])
