"""DataModules, imported on first use (PEP 562): `finetune.data.images`, `.folder` and
`.transforms` then load without Lightning, which `finetune predict --exported` must not need."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.data.classification import ImageFolderDataModule
    from finetune.data.identity import IdentityFolderDataModule
    from finetune.data.manifest_module import ManifestDataModule
    from finetune.data.segmentation import SegmentationFolderDataModule
    from finetune.data.shards import ShardDataModule, ShardSegmentationDataModule

_MODULES = {
    "ImageFolderDataModule": "finetune.data.classification",
    "IdentityFolderDataModule": "finetune.data.identity",
    "ManifestDataModule": "finetune.data.manifest_module",
    "SegmentationFolderDataModule": "finetune.data.segmentation",
    "ShardDataModule": "finetune.data.shards",
    "ShardSegmentationDataModule": "finetune.data.shards",
}

__all__ = ["IdentityFolderDataModule", "ImageFolderDataModule", "ManifestDataModule", "SegmentationFolderDataModule",
           "ShardDataModule", "ShardSegmentationDataModule"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
