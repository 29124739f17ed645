"""Normalise uint8 batches on the device, after the transfer (see finetune.data.transforms)."""

from __future__ import annotations

import torch


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float32 (x / 255 - mean) / std, as albumentations' Normalize."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=images.device).view(1, -1, 1, 1)
    return images.float().mul_(scale).sub_(shift)


class NormalizeOnDevice:
    """DataModule mixin: uint8 `batch["image"]` becomes normalised float32 once on the device.

    Lightning calls `on_after_batch_transfer` in every stage (fit, validate, test, predict),
    so whatever reads a batch after it (the model, media loggers) sees normalised images.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) and batch["image"].dtype == torch.uint8:
            batch["image"] = normalize_images(batch["image"], self.mean, self.std)
        return batch
