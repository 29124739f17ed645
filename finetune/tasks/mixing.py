"""Mixup and CutMix of a training batch on the device, with soft targets (timm's train.py recipe).

The mixing itself is torchvision.transforms.v2's MixUp / CutMix (any batch size: each image is
mixed with its neighbour, `roll(1)`; a batch of one is mixed with itself, i.e. unchanged). They
draw lambda and the box from torch's CPU generator, which is seeded here per optimizer step from
(run seed, step, rank): a resumed run mixes exactly as the uninterrupted one, and nothing reads
the device (no host sync in the step).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


class BatchMixing:
    """`mixup` / `cutmix`: the Beta(alpha, alpha) parameters (0: that one is off). With both on,
    CutMix is picked with probability `switch_prob`; a batch is mixed at all with probability
    `prob`. Targets are the mixed one-hot labels with `label_smoothing` applied (what timm's
    `mixup_target` computes), for cross-entropy with probabilities as targets. Multi-hot
    targets (multi-label, [N, classes]) are mixed as they are, without smoothing here.
    `off_epochs`: the last N epochs train on plain batches (timm's `--mixup-off-epoch`)."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, prob: float, switch_prob: float,
                 label_smoothing: float, off_epochs: int = 0):
        self.num_classes, self.prob, self.label_smoothing = num_classes, prob, label_smoothing
        self.off_epochs = off_epochs
        choices, weights = [], []
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
            weights.append(switch_prob if mixup > 0 else 1.0)
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
            weights.append(1.0 - switch_prob if cutmix > 0 else 1.0)
        if not choices:
            raise ValueError("BatchMixing needs model.mixup > 0 or model.cutmix > 0")
        self.mix = v2.RandomChoice(choices, p=weights)

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether `epoch` mixes: all but the last `off_epochs` of a run with a known length."""
        off = self.off_epochs
        return not (off and max_epochs and max_epochs > 0 and epoch >= max_epochs - off)

    def __call__(self, images: Tensor, labels: Tensor, step: int, rank: int = 0) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only; the training's own is untouched
            # Not torch.manual_seed: it would reseed the GPU's generator too, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(hash((_run_seed(), step, rank)) & (2**63 - 1))
            if torch.rand(()).item() < self.prob:
                images, targets = self.mix(images, labels)
            else:
                targets = labels.to(images.dtype) if labels.dim() == 2 else F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets


def _run_seed() -> int:
    # Lightning's seed_everything records the run's seed here (also for DDP's other processes).
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
