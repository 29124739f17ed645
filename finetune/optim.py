"""Optimizer and learning-rate schedule shared by every task."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["cosine", "poly", "constant", "onecycle", "plateau"]


def decay_split(name: str, params: list[nn.Parameter], weight_decay: float, lr: float, **extra) -> list[dict]:
    """Two optimizer groups: weights with decay, and 1-D tensors (norms, biases) without.

    Decaying BN scales and biases only pulls them towards zero and hurts fine-tuning (the
    timm and fastai defaults exclude them too). Groups carry a `name` for LR logging.
    """
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"name": name, "params": decay, "weight_decay": weight_decay, "lr": lr, **extra})
    if no_decay:
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr, **extra})
    return groups


def build_optimizer(name: OptimizerName, groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"model.optimizer: {name!r} is not one of adamw, sgd")


def warmup_then(name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier per optimizer step: linear warmup, then cosine, poly (power 0.9, the
    DeepLab recipe) or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "poly":
            return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** 0.9
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    name: SchedulerName, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> dict:
    """A Lightning lr_scheduler config. Every scheduler scales each group's own initial LR,
    so per-stage multipliers survive it."""
    if name in ("cosine", "poly", "constant"):
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then(name, total_steps, warmup_steps, min_lr_ratio))
        return {"scheduler": schedule, "interval": "step"}
    if name == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(2, total_steps),
            pct_start=min(0.5, max(warmup_steps, 1) / max(2, total_steps)),
        )
        return {"scheduler": schedule, "interval": "step"}
    if name == "plateau":
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.3, patience=2)
        return {"scheduler": schedule, "interval": "epoch", "monitor": "val/loss"}
    raise ValueError(f"model.scheduler: {name!r} is not one of cosine, poly, constant, onecycle, plateau")
