"""Load a local weights file into a timm backbone, whatever shape the file comes in.

Checkpoints in the wild wrap the tensors (`{"state_dict": ...}`, `{"model": ...}`), prefix
them (`module.` from DataParallel, `model.`/`backbone.` from a training wrapper) and carry an
old classifier. timm's own `pretrained_cfg_overlay=dict(file=...)` expects a clean file, so
we unwrap and align keys here, then load with a report instead of a silent `strict=False`.

The training checkpoints of timm's `train.py` (`state_dict`, `state_dict_ema`, `args`) and of
torchvision's reference scripts (`model`, `model_ema`, `args`) store their arguments as an
`argparse.Namespace`: that one class is allowed to unpickle (as timm's own loader does), nothing
else. Their EMA weights are loaded where present: those are the weights such runs are judged by.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath

import torch
from torch import nn

from finetune.errors import UnsafeFileError, unreadable_file_message

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "weights")
# The EMA of the weights in timm's train.py (`state_dict_ema`) and torchvision's reference
# scripts (`model_ema`, an AveragedModel: `module.`-prefixed, plus its `n_averaged` counter).
_EMA_KEYS = ("state_dict_ema", "model_ema")
# Training arguments some checkpoints carry: plain values in a Namespace, the only class allowed.
_SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class LoadReport:
    prefix: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_classifier: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.ckpt/.safetensors file, unwrapped from common containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        try:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise UnsafeFileError(
                unreadable_file_message("model.weights", path, err)
                or f"model.weights: {path} could not be read as plain tensors ({type(err).__name__}); "
                "re-save it with torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
    if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), dict) and "state_dict" in obj:
        hp = obj["hyper_parameters"]
        log.info(
            "model.weights: %s is a finetune/Lightning checkpoint (%s, %s classes): its backbone is loaded, "
            "its head is not (the new head starts from scratch); to continue that training use --ckpt_path",
            path, hp.get("backbone", "?"), hp.get("num_classes", "?"),
        )
    ema = next((key for key in _EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]), None)
    if ema is not None:
        log.info("model.weights: %s is a training checkpoint with an EMA of its weights (%s): loading the EMA", path, ema)
        obj = {k: v for k, v in obj[ema].items() if k != "n_averaged"}
    while isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise ValueError(f"model.weights: {path} holds no state_dict (looked under {', '.join(_WRAPPER_KEYS)})")


def best_prefix(file_keys: list[str], model_keys: set[str]) -> str:
    """The key prefix whose removal makes the most file keys match the model.

    Handles `module.`, `model.backbone.`, `module.pre.` and any other wrapper without a list
    of known names, and leaves keys of other sub-modules (an old head) out of the match.
    """
    votes: Counter[str] = Counter()
    for key in file_keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        return ""
    return max(votes.items(), key=lambda kv: (kv[1], -len(kv[0])))[0]


def load_backbone_weights(model: nn.Module, path: str | Path, classifier: str = "fc") -> LoadReport:
    """Load `path` into `model` (a timm model built with num_classes=0) and report what happened."""
    source = read_state_dict(path)
    target = model.state_dict()
    prefix = best_prefix(list(source), set(target))
    aligned, unexpected, dropped = {}, [], []
    for key, tensor in source.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is not None and name in target:
            aligned[name] = tensor
        elif name is not None and (name == classifier or name.startswith(classifier + ".")):
            dropped.append(key)
        else:
            unexpected.append(key)
    if not aligned:
        raise ValueError(
            f"model.weights: no tensor in {path} matches the backbone's keys "
            f"(e.g. {next(iter(target))!r}); is it weights for another architecture?"
        )
    for name, tensor in aligned.items():
        if tensor.shape != target[name].shape:
            raise ValueError(
                f"model.weights: {prefix}{name} in {path} has shape {tuple(tensor.shape)}, the backbone "
                f"expects {tuple(target[name].shape)}; the file is for a different model variant"
            )
    missing = sorted(set(target) - set(aligned))
    model.load_state_dict(aligned, strict=False)
    report = LoadReport(prefix, len(aligned), missing, unexpected, dropped)
    log.info(
        "Loaded %d tensors from %s (prefix %r stripped, old classifier %s dropped)",
        report.loaded, path, prefix, dropped or "none",
    )
    if missing:
        log.warning("%d backbone tensors were not in %s and keep their init: %s", len(missing), path, missing[:8])
    if unexpected:
        log.warning("%d tensors in %s match nothing in the backbone: %s", len(unexpected), path, unexpected[:8])
    return report


def plain_hyperparameters(checkpoint: dict) -> None:
    """Hyperparameters as types `torch.load(weights_only=True)` accepts: str for paths and
    str enums, Python numbers for numpy ones, lists for arrays. Our tasks store plain values
    already; this keeps our checkpoints loadable without trusting pickle if one slips in."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else list(map(plain, value))
        if isinstance(value, Enum):
            return plain(value.value)
        for kind in (bool, int, float, str):  # also their subclasses (numpy.float64 is a float)
            if isinstance(value, kind):
                return kind.__str__(value) if kind is str else kind(value)
        if isinstance(value, PurePath):
            return str(value)
        if hasattr(value, "tolist"):  # numpy scalars and arrays
            return value.tolist()
        return value  # a tensor, None, or something torch.load(weights_only=True) will name

    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = plain(checkpoint[key])


def check_checkpoint_matches(hparams, checkpoint: dict, path) -> None:
    """One-line errors, before Lightning's wall of `size mismatch` lines, when `--ckpt_path`
    holds another backbone or another number of classes than the data and config give."""
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict):
        return
    path = path or "the checkpoint"
    arch = {str(h.get("backbone", "")).partition(".")[0] for h in (saved, hparams)}  # tags share weights' shapes
    if len(arch) > 1 and "backbone" in saved and "backbone" in hparams:
        raise ValueError(
            f"ckpt_path: {path} holds a {saved['backbone']} model, but model.backbone is {hparams['backbone']}; "
            f"pass --model.backbone {saved['backbone']}"
        )
    if "num_classes" in saved and "num_classes" in hparams and saved["num_classes"] != hparams["num_classes"]:
        raise ValueError(
            f"ckpt_path: {path} was trained on {saved['num_classes']} classes ({_names(saved)}), but data.root "
            f"has {hparams['num_classes']} ({_names(hparams)}); point --data.root at data with the same classes, "
            f"or fine-tune a new head from it with --model.weights {path} (and no --ckpt_path)"
        )
    if saved.get("class_names") and hparams.get("class_names") and list(saved["class_names"]) != list(
        hparams["class_names"]
    ):
        log.warning(
            "ckpt_path: %s was trained on classes %s, data.root has %s: labels are matched by position",
            path, _names(saved), _names(hparams),
        )


def _names(hparams, shown: int = 5) -> str:
    names = list(hparams.get("class_names") or [])
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "") if names else "names not stored"
