"""albumentations pipelines whose size and normalisation default to the backbone's own.

The DataModules ask for `normalize=False`: workers then ship uint8 tensors (a quarter of
float32's bytes, which is what limits a DataLoader feeding a GPU) and the DataModule
normalises whole batches on the device (`finetune.data.normalize`). Either way the model gets
the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
# RandomResizedCrop's aspect-ratio range (albumentations' and torchvision's default).
CROP_RATIO = (3 / 4, 4 / 3)
DECODE_FACTORS = (8, 4, 2)
Augment = Literal["light", "randaugment", "trivialaugment", "autoaugment"]  # finetune.data.augment
Crop = Literal["random_resized", "whole"]  # training crop; "whole" evaluates squashed too
ResizeMode = Literal["crop", "squash"]  # evaluation: short side + centre crop, or the whole image


class ToPlanarTensor(ToTensorV2):
    """ToTensorV2 that returns contiguous CHW planes instead of a transposed view of HWC.

    The view's strided copy into the batch, in DataLoader workers, cost ~120 us a 224 px image
    (a tenth of decoding it); OpenCV's SIMD split into planes and a contiguous stack ~55 us.
    Same values, same shape."""

    def apply(self, img: np.ndarray, **params) -> torch.Tensor:
        if img.ndim == 3 and img.shape[2] > 1:
            return torch.from_numpy(np.stack(cv2.split(img)))
        return super().apply(img, **params)


def compose_to_tensor(steps: list, mean, std, normalize: bool, tensor_steps: list = ()) -> A.Compose:
    """`steps`, then (if `normalize`) Normalize, then planar CHW tensors: every task's tail.
    `tensor_steps`: torchvision transforms on that uint8 tensor (finetune.data.augment)."""
    tail = []
    if tensor_steps:
        if normalize:
            raise ValueError("augmentation policies run on uint8 tensors: build the pipeline with normalize=False")
        from finetune.data.augment import TorchvisionStep  # torchvision: ~1 s to import, training only

        tail = [TorchvisionStep(list(tensor_steps))]
    return A.Compose([*steps, *([A.Normalize(mean=mean, std=std)] if normalize else []), ToPlanarTensor(), *tail])


def _largest_factor(covers) -> int:
    return next((f for f in DECODE_FACTORS if covers(f)), 1)


@dataclass(frozen=True)
class CropShrink:
    """Decode reduction for RandomResizedCrop(size, scale): the smallest crop it can take
    (area scale[0], the narrowest allowed aspect) must still be >= `size` pixels on each side
    after shrinking, so no crop is ever upsampled where the full image would not have been.
    RandomResizedCrop draws scale and aspect relative to the image, so its crops of the
    shrunk image are those of the full one, scaled."""

    size: int
    min_scale: float

    def __call__(self, width: int, height: int) -> int:
        side = math.sqrt(self.min_scale * width * height * CROP_RATIO[0])
        return _largest_factor(lambda f: min(side, width, height) / f >= self.size)


@dataclass(frozen=True)
class ResizeShrink:
    """Decode reduction for resizing the short side to `short_side`."""

    short_side: int

    def __call__(self, width: int, height: int) -> int:
        return _largest_factor(lambda f: min(width, height) / f >= self.short_side)


def train_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.25, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    normalize: bool = True,
    crop: Crop = "random_resized",
    augment: Augment = "light",
    augment_ops: int = 2,
    augment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> A.Compose:
    """Crop ("random_resized": RandomResizedCrop over `scale` of the area; "whole": the whole
    image squashed to size x size) and flip, then the `augment` policy and random erasing
    (finetune.data.augment; those need `normalize=False`)."""
    if crop == "random_resized":
        first = A.RandomResizedCrop(size=(size, size), scale=tuple(scale), ratio=CROP_RATIO, interpolation=_INTERPOLATION[interpolation])
    else:
        first = _squash(size, interpolation)
    from finetune.data.augment import policy_steps

    policy = policy_steps(augment, mean, augment_ops, augment_magnitude, random_erasing)
    return compose_to_tensor([first, A.HorizontalFlip(p=hflip)], mean, std, normalize, policy)


def eval_transform(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    normalize: bool = True,
    resize_mode: ResizeMode = "crop",
) -> A.Compose:
    if resize_mode == "squash":  # the whole image, aspect not kept: what "whole" trains on
        return compose_to_tensor([_squash(size, interpolation)], mean, std, normalize)
    if resize_mode != "crop":
        raise ValueError(f"resize_mode: {resize_mode!r} is neither 'crop' nor 'squash'")
    # timm's eval recipe: resize the short side to size / crop_pct, then centre-crop.
    return compose_to_tensor([
        A.SmallestMaxSize(max_size=eval_resize(size, crop_pct), interpolation=_INTERPOLATION[interpolation]),
        A.CenterCrop(height=size, width=size),
    ], mean, std, normalize)


def _squash(size: int, interpolation: str) -> A.Resize:
    return A.Resize(height=size, width=size, interpolation=_INTERPOLATION[interpolation])


def eval_resize(size: int, crop_pct: float) -> int:
    return math.floor(size / crop_pct)


def eval_shrink(size: int, crop_pct: float, resize_mode: ResizeMode = "crop") -> ResizeShrink:
    """Decode reduction for `eval_transform`: its resize's short side must not be upsampled."""
    return ResizeShrink(size if resize_mode == "squash" else eval_resize(size, crop_pct))
