"""Freeze/unfreeze schedules and discriminative learning rates over a backbone's own stages.

Design (Lightning's BackboneFinetuning breaks resume by adding optimizer groups mid-run,
pytorch-lightning #6891, #8502, and its `freeze(train_bn=False)` leaves BatchNorm in train mode, #15062):
- Every stage is in the optimizer from the first step, with its LR multiplier. Freezing is
  `requires_grad=False`: a frozen parameter gets no gradient, so no optimizer (SGD, AdamW)
  touches it, while the optimizer's groups, and so any LR scheduler and any resume, see one
  constant shape. The LR logged for a frozen group is 0, which is what it effectively gets.
- Which stages are trainable is a pure function of the epoch, so every DDP rank and every
  resumed run computes the same set.
- BatchNorm of a frozen stage runs in eval mode (running statistics untouched) unless
  `train_bn` is set; `apply()` re-asserts that after anything calls `.train()`.
- Norms are found by name each time: `--trainer.sync_batchnorm true` replaces every BatchNorm
  with a new SyncBatchNorm when the strategy sets up (and back at teardown), so a list of
  module objects taken earlier would manage modules that no longer run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import torch
from timm.models import group_parameters
from torch import nn

Strategy = Literal["none", "frozen", "freeze_then_unfreeze", "gradual"]
STRATEGIES = ("none", "frozen", "freeze_then_unfreeze", "gradual")
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


class FinetuningConfig(TypedDict, total=False):
    """`model.finetuning` in YAML; every key is optional.

    strategy: none (all trains) | frozen (head only: a linear probe) | freeze_then_unfreeze
        (all stages at unfreeze_at[0]) | gradual (stage by stage from the head down).
    unfreeze_at: epochs at which the stages become trainable, from the last stage to the
        first (ResNet: layer4, layer3, layer2, stem+layer1). Default [1, 2, 3, 4].
    lr_decay: each stage further from the head gets lr * lr_decay once more. Default 1.0.
    lr_mult: explicit LR multipliers, from the last stage to the first (overrides lr_decay).
    train_bn: BatchNorm of frozen stages keeps training (fastai's default). Default: true for
        freeze_then_unfreeze and gradual, false for frozen (a linear probe leaves the backbone
        bit-identical). Measured by benchmarks/train_bn_default.py; see the README.
    """

    strategy: Strategy
    unfreeze_at: list[int]
    lr_decay: float
    lr_mult: list[float]
    train_bn: bool


DEFAULTS: FinetuningConfig = {"strategy": "none", "unfreeze_at": [1, 2, 3, 4], "lr_decay": 1.0}


@dataclass
class Stage:
    name: str
    # Parameters survive SyncBatchNorm conversion (it moves them into the new module);
    # the norm modules themselves do not, hence names.
    params: list[nn.Parameter] = field(default_factory=list)
    norm_names: list[str] = field(default_factory=list)

    def norms(self, backbone: nn.Module) -> list[nn.Module]:
        """The stage's BatchNorm modules as they are in `backbone` now."""
        return [backbone.get_submodule(name) for name in self.norm_names]


def _group_matcher(backbone: nn.Module) -> dict:
    if hasattr(backbone, "group_matcher"):
        return backbone.group_matcher(coarse=True)
    # features_only wrappers (segmentation) drop group_matcher; the architecture's own, from a
    # parameter-less copy on the meta device, matches the same ResNet parameter names.
    import timm

    arch = backbone.pretrained_cfg["architecture"]
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False).group_matcher(coarse=True)


def backbone_stages(backbone: nn.Module) -> list[Stage]:
    """The backbone's stages from timm's own `group_matcher`, ordered from the head down.

    The stem merges into the first block stage, and anything after the last block stage
    (ResNetV2's final norm) into the last one: a ResNet gives layer4, layer3, layer2,
    stem+layer1.
    """
    matcher = _group_matcher(backbone)
    blocks = matcher["blocks"]
    if not isinstance(blocks, str):
        raise ValueError(f"{type(backbone).__name__}: only string block matchers are supported, got {blocks!r}")
    groups = group_parameters(backbone, matcher)  # {group id: [param names]}, stem first
    modules = dict(backbone.named_modules())
    params = dict(backbone.named_parameters())
    stages: list[Stage] = []
    pending_stem: list[str] = []
    for gid in sorted(groups):
        names = groups[gid]
        match = re.match(blocks, names[0])
        if match is None and not stages:
            pending_stem += names  # the stem: joins the first block stage
            continue
        if match is None:
            stage = stages[-1]  # a trailing norm: joins the last block stage
        else:
            stage = Stage(("stem+" if pending_stem else "") + match.group(0))
            stages.append(stage)
            names = pending_stem + names
            pending_stem = []
        stage.params += [params[n] for n in names]
        owners = {n.rsplit(".", 1)[0] for n in names}
        stage.norm_names += [o for o in sorted(owners) if isinstance(modules.get(o), _BATCHNORMS)]
    return stages[::-1]


def resolve(config: FinetuningConfig | None, num_stages: int, stage_names: list[str]) -> FinetuningConfig:
    """Defaults filled in, and checked against the backbone's stages with one-line errors."""
    resolved: FinetuningConfig = {**DEFAULTS, **(config or {})}
    resolved.setdefault("train_bn", resolved["strategy"] != "frozen")
    if resolved["strategy"] not in STRATEGIES:
        raise ValueError(f"model.finetuning.strategy: {resolved['strategy']!r} is not one of {', '.join(STRATEGIES)}")
    unfreeze_at = resolved["unfreeze_at"]
    if resolved["strategy"] == "gradual" and len(unfreeze_at) != num_stages:
        raise ValueError(
            f"model.finetuning.unfreeze_at: {len(unfreeze_at)} epochs for {num_stages} stages "
            f"({', '.join(stage_names)}); give one epoch per stage"
        )
    if resolved["strategy"] == "freeze_then_unfreeze" and not unfreeze_at:
        raise ValueError("model.finetuning.unfreeze_at: give the epoch at which everything unfreezes, e.g. [1]")
    if "lr_mult" in resolved and len(resolved["lr_mult"]) != num_stages:
        raise ValueError(
            f"model.finetuning.lr_mult: {len(resolved['lr_mult'])} values for {num_stages} stages ({', '.join(stage_names)})"
        )
    return resolved


def lr_multipliers(config: FinetuningConfig, num_stages: int) -> list[float]:
    """Per stage, from the head down: lr_mult if given, else lr_decay ** (1 + distance)."""
    if "lr_mult" in config:
        return list(config["lr_mult"])
    return [config["lr_decay"] ** (i + 1) for i in range(num_stages)]


def trainable_stage_count(config: FinetuningConfig, num_stages: int, epoch: int) -> int:
    """How many stages, counted from the head, train at `epoch`."""
    strategy = config["strategy"]
    if strategy == "none":
        return num_stages
    if strategy == "frozen":
        return 0
    if strategy == "freeze_then_unfreeze":
        return num_stages if epoch >= config["unfreeze_at"][0] else 0
    return sum(epoch >= at for at in config["unfreeze_at"])


def apply(backbone: nn.Module, stages: list[Stage], trainable: int, train_bn: bool, training: bool = True) -> None:
    """Set requires_grad and BatchNorm modes for `trainable` stages counted from the head.

    `training` is the mode the rest of the model is in; frozen BatchNorm is in eval mode
    whatever it is, unless `train_bn`, where BatchNorm trains (and learns) in every stage.
    """
    for index, stage in enumerate(stages):
        is_trainable = index < trainable
        for param in stage.params:
            param.requires_grad_(is_trainable)
        for norm in stage.norms(backbone):
            norm.train(training and (is_trainable or train_bn))
            if train_bn:
                for param in norm.parameters():
                    param.requires_grad_(True)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

