"""Optimizer and learning-rate schedule shared by every task."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["cosine", "constant"]


def decay_groups(modules: dict[str, nn.Module], weight_decay: float) -> list[dict]:
    """Two groups per named module: weights with decay, norms and biases without.

    Decaying BN scales and biases only pulls them towards zero and hurts fine-tuning (the
    timm and fastai defaults exclude them too). Groups carry a `name` for LR logging.
    """
    groups = []
    for name, module in modules.items():
        decay, no_decay = [], []
        for param_name, param in module.named_parameters():
            (no_decay if param.ndim <= 1 or param_name.endswith(".bias") else decay).append(param)
        if decay:
            groups.append({"name": name, "params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(name: OptimizerName, groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"model.optimizer: {name!r} is not one of adamw, sgd")


def warmup_then(name: SchedulerName, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier per optimizer step: linear warmup, then cosine decay or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
