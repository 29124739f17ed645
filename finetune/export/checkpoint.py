"""Load a `finetune fit` checkpoint for export: the task (pretrained weights never fetched), its
kind, its preprocessing and its training config, as plain values."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.backbones import data_config
from finetune.data.segmentation_classes import default_palette, read_class_list
from finetune.export.metadata import plain
from finetune.tasks import ClassificationTask, EmbeddingTask, SegmentationTask
from finetune.tasks.base import FinetuneTask

log = logging.getLogger(__name__)

KINDS = ((SegmentationTask, "segmentation"), (EmbeddingTask, "embedding"), (ClassificationTask, "classification"))


@dataclass
class Loaded:
    task: FinetuneTask
    kind: str  # classification | segmentation | embedding
    preprocessing: dict  # input_size, mean, std, crop_pct, interpolation (+ min_input_size)
    config: dict  # {"model": {"class_path", "init_args"}, "data": {...} or None}
    palette: list | None  # segmentation class colours
    data_root: str | None


def task_kind(task: FinetuneTask) -> str:
    for cls, kind in KINDS:
        if isinstance(task, cls):
            return kind
    raise ValueError(f"{type(task).__name__}: export knows ClassificationTask, SegmentationTask and EmbeddingTask")


def task_class(class_path: str) -> type[FinetuneTask]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"model class {class_path!r} cannot be imported; is the package that defines it installed?") from None
    if not (isinstance(cls, type) and issubclass(cls, FinetuneTask)):
        raise TypeError(f"model class {class_path!r} is not a finetune task")
    return cls


def _class_path(hparams: dict) -> str:
    # LightningCLI stores `_class_path`; a task built in Python has none, so tell by its arguments.
    if "_class_path" in hparams:
        return hparams["_class_path"]
    if "output_stride" in hparams:
        return "finetune.tasks.SegmentationTask"
    if "margin_head" in hparams:
        return "finetune.tasks.EmbeddingTask"
    return "finetune.tasks.ClassificationTask"


def _init_args(hparams: dict) -> dict:
    return plain({k: v for k, v in hparams.items() if not k.startswith("_")})


def resolve_preprocessing(kind: str, backbone: str, data: dict, task: FinetuneTask) -> dict:
    """As the DataModules resolve it: the data config's value, else the backbone's pretrained one."""
    pretrained = data_config(backbone)
    prep = {"mean": list(data.get("mean") or pretrained["mean"]), "std": list(data.get("std") or pretrained["std"])}
    if kind == "segmentation":  # evaluated at full resolution (seg_eval_transform): no resize, no crop
        return {"input_size": None, **prep, "crop_pct": None, "interpolation": None,
                "min_input_size": task.hparams.output_stride}
    size = data.get("image_size") or pretrained["input_size"][-1]
    return {
        "input_size": [3, size, size], **prep,
        "crop_pct": data.get("crop_pct") or pretrained["crop_pct"],
        "interpolation": data.get("interpolation") or pretrained["interpolation"],
    }


def _palette(kind: str, num_classes: int, data: dict) -> list | None:
    if kind != "segmentation":
        return None
    try:  # the colours of the data's classes.yaml, when the data is still where it was
        return [list(c) for c in read_class_list(Path(data["root"]).expanduser(), data.get("class_names"))[1]]
    except (KeyError, TypeError, OSError, ValueError):
        return [list(c) for c in default_palette(num_classes)]


def load_checkpoint(path: str | Path) -> Loaded:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path: {path} does not exist; pass a checkpoint of `finetune fit` (runs/<name>/checkpoints/last.ckpt)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: hyperparameters only
    except Exception as err:  # noqa: BLE001  (not a zip, not plain tensors: many error types)
        raise ValueError(f"--ckpt_path: {path} is not a PyTorch checkpoint ({type(err).__name__})") from None
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not hparams or "backbone" not in hparams:
        raise ValueError(f"--ckpt_path: {path} has no finetune hyperparameters; export a checkpoint written by `finetune fit`")
    class_path = _class_path(hparams)
    # The checkpoint's weights replace the backbone's, so don't fetch pretrained ones (as cli.py does for predict).
    task = task_class(class_path).load_from_checkpoint(path, map_location="cpu", pretrained=False, weights=None).eval()
    kind = task_kind(task)
    data = raw.get("datamodule_hyper_parameters") or {}
    if not data:
        log.warning("%s holds no data config: preprocessing from %s's pretrained config", path, hparams["backbone"])
    config = {
        "model": {"class_path": class_path, "init_args": _init_args(hparams)},
        "data": {"class_path": data.get("_class_path"), "init_args": _init_args(data)} if data else None,
    }
    return Loaded(
        task=task, kind=kind, preprocessing=resolve_preprocessing(kind, hparams["backbone"], data, task),
        config=config, palette=_palette(kind, len(task.class_names), data), data_root=data.get("root"),
    )
