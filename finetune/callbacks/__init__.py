"""Callbacks, imported on first use (PEP 562): importing one loads only its own module."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.callbacks.checkpoint import ModelCheckpoint
    from finetune.callbacks.ema import EMA
    from finetune.callbacks.embedding import WandbEmbeddingLogger
    from finetune.callbacks.media import WandbMediaLogger
    from finetune.callbacks.predictions import PredictionWriter
    from finetune.callbacks.progress import ProgressBar
    from finetune.callbacks.report import RunReport
    from finetune.callbacks.segmentation import WandbMaskLogger

_MODULES = {
    "EMA": "finetune.callbacks.ema",
    "ModelCheckpoint": "finetune.callbacks.checkpoint",
    "PredictionWriter": "finetune.callbacks.predictions",
    "ProgressBar": "finetune.callbacks.progress",
    "RunReport": "finetune.callbacks.report",
    "WandbEmbeddingLogger": "finetune.callbacks.embedding",
    "WandbMaskLogger": "finetune.callbacks.segmentation",
    "WandbMediaLogger": "finetune.callbacks.media",
    "GradientFlow": "finetune.callbacks.gradient_flow",
}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EMA",
    "GradientFlow",
    "ModelCheckpoint",
    "PredictionWriter",
    "ProgressBar",
    "RunReport",
    "WandbEmbeddingLogger",
    "WandbMaskLogger",
    "WandbMediaLogger",
]
