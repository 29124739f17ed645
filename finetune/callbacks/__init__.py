"""Callbacks, imported on first use (PEP 562): `finetune.callbacks.outputs` (the prediction
files) then loads without Lightning, which `finetune predict --exported` must not need."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.callbacks.checkpoint import ModelCheckpoint
    from finetune.callbacks.embedding import EmbeddingWriter, WandbEmbeddingLogger
    from finetune.callbacks.media import WandbMediaLogger
    from finetune.callbacks.predictions import PredictionCSVWriter
    from finetune.callbacks.progress import ProgressBar
    from finetune.callbacks.segmentation import SegmentationMaskWriter, WandbMaskLogger

_MODULES = {
    "EmbeddingWriter": "finetune.callbacks.embedding",
    "ModelCheckpoint": "finetune.callbacks.checkpoint",
    "PredictionCSVWriter": "finetune.callbacks.predictions",
    "ProgressBar": "finetune.callbacks.progress",
    "SegmentationMaskWriter": "finetune.callbacks.segmentation",
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
    "EmbeddingWriter",
    "GradientFlow",
    "ModelCheckpoint",
    "PredictionCSVWriter",
    "ProgressBar",
    "SegmentationMaskWriter",
    "WandbEmbeddingLogger",
    "WandbMaskLogger",
    "WandbMediaLogger",
]
