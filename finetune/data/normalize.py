"""Normalise uint8 batches on the device, after the transfer (see finetune.data.transforms)."""

from __future__ import annotations

import functools

import torch


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float32 (x / 255 - mean) / std, as albumentations' Normalize, in
    the input's memory format (`.float()` and in-place ops keep channels_last)."""
    scale, shift = _scale_shift(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=16)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    # Built once per device: torch.tensor(list, device=cuda) is a blocking host-to-device copy
    # from pageable memory, which on every step would stall the GPU queue.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


class NormalizeOnDevice:
    """DataModule mixin: uint8 `batch["image"]` becomes normalised float32 once on the device.

    Lightning calls `on_after_batch_transfer` in every stage (fit, validate, test, predict),
    so whatever reads a batch after it (the model, media loggers) sees normalised images.
    With `channels_last` (set by finetune.speed.apply_speed_settings) the uint8 batch is
    converted first: a quarter of the bytes of converting the float batch in the model.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool = False

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) and batch["image"].dtype == torch.uint8:
            images = batch["image"]
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            batch["image"] = normalize_images(images, self.mean, self.std)
        return batch
