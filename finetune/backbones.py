"""ResNet-family backbones through timm: names, creation, weights and preprocessing config."""

from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from typing import Literal

import timm
from timm.data import resolve_data_config
from torch import nn

from finetune.hub import PretrainedWeightsUnavailable, pretrained_overlay
from finetune.weights import load_backbone_weights

log = logging.getLogger(__name__)

# The families this project tests on every change (tests/test_backbones.py). Any other timm
# architecture is accepted too, and its weight tags such as `resnet50.tv2_in1k`.
SUPPORTED_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "resnetv2_50",
)

Pretrained = bool | Literal["auto"]


@lru_cache(maxsize=1)
def _architectures() -> frozenset[str]:
    return frozenset(timm.list_models())


@lru_cache(maxsize=1)
def _tagged_names() -> frozenset[str]:
    return frozenset(timm.list_pretrained())


def check_backbone_name(name: str) -> str:
    """Return `name` if timm knows it, else raise a one-line error listing close matches."""
    arch, _, tag = name.partition(".")
    if arch in _architectures() and (not tag or name in _tagged_names()):
        return name
    pool = _tagged_names() if tag else _architectures()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"tested: {', '.join(SUPPORTED_BACKBONES)}"
    raise ValueError(f"model.backbone: unknown timm model {name!r}; {hint}")


def classifier_name(name: str) -> str:
    """Module path of the original classifier (`fc` in ResNet, `head.fc` in ResNetV2)."""
    cfg = timm.get_pretrained_cfg(name)
    return (cfg.classifier if cfg and cfg.classifier else "fc")


def create_backbone(
    name: str,
    pretrained: Pretrained = False,
    weights: str | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm model without its classifier, so that the task's head sits on top.

    `timm_kwargs` pass through (`features_only=True, output_stride=8` for segmentation);
    by default the model returns the last feature map (`num_classes=0, global_pool=""`).
    `weights` (a local file) wins over `pretrained`. With `pretrained="auto"` an unreachable
    hub falls back to random init with a warning instead of an error.
    """
    check_backbone_name(name)
    kwargs = {"num_classes": 0, "global_pool": ""} if not timm_kwargs.get("features_only") else {}
    kwargs.update(timm_kwargs)
    use_hub = bool(pretrained) and weights is None
    if use_hub:
        try:
            kwargs.update(pretrained_overlay(name))
        except PretrainedWeightsUnavailable as err:
            if pretrained != "auto":
                raise
            log.warning("%s -> training %s from random init (model.pretrained: auto)", err, name)
            use_hub = False
    model = timm.create_model(name, pretrained=use_hub, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights, classifier=classifier_name(name))
    return model


def data_config(name: str) -> dict:
    """Input size, interpolation, mean, std and crop_pct of the backbone's pretrained weights.

    Resolved from timm's pretrained config without building the model, so the DataModule can
    set its transforms before the model exists.
    """
    cfg = timm.get_pretrained_cfg(check_backbone_name(name))
    return resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
