"""What a task promises the rest of the tool, declared once on the task class (`contract`).

Export, `finetune predict` (from a checkpoint or an exported file) and the CLI read a task
through this, never by testing its type or the keys of its outputs:

- `name`: the task's name in exported metadata (`task`) and messages;
- `network`: the plain `nn.Module` class the task trains (finetune.models); its
  `from_hparams(hparams)` builds it from the task's hyperparameters, in the task and, without
  Lightning, from a checkpoint for export;
- `outputs`: the names of `network.predict(images)`'s outputs, in the exported graph's order,
  with what each holds (written into the exported file's metadata);
- `writer`: the finetune.writers name of how predictions become files;
- `monitor`, `mode`: the validation metric the best checkpoint is chosen by;
- `full_resolution`: images are evaluated at their own size (no resize, no crop);
- `min_input_size`: the smallest image side the network takes, from the hyperparameters (a
  segmentation network's output stride), for `check-data` and exported metadata;
- `metadata`: extra metadata from (model hyperparameters, data hyperparameters): a
  segmentation palette, an embedding size.

No torch or Lightning import here: `finetune predict --exported` reads exported metadata alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def no_extras(hparams: dict, data: dict) -> dict:
    return {}


def any_size(hparams: dict) -> int | None:
    return None


@dataclass(frozen=True)
class TaskContract:
    name: str
    network: type
    outputs: dict[str, str]
    writer: str
    monitor: str
    mode: str = "max"
    full_resolution: bool = False
    min_input_size: Callable[[dict], int | None] = field(default=any_size)
    metadata: Callable[[dict, dict], dict] = field(default=no_extras)


def import_class(class_path: str) -> type:
    """The class a config or checkpoint names by its import path (`finetune.tasks.ClassificationTask`)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{class_path!r} cannot be imported; is the package that defines it installed?") from None


def contract_of(class_path: str) -> TaskContract:
    """The contract of the task class `class_path` names."""
    contract = getattr(import_class(class_path), "contract", None)
    if not isinstance(contract, TaskContract):
        raise TypeError(f"model class {class_path!r} is not a finetune task: it declares no TaskContract")
    return contract


def class_names_of(hparams) -> list[str]:
    """A task's class names: the data's, or the class indices where it was built without them."""
    return list(hparams.get("class_names") or [str(i) for i in range(hparams["num_classes"])])


def build_network(network: type, hparams: dict):
    """`network` as a checkpoint's hyperparameters describe it, with no pretrained weights
    fetched or read: the checkpoint's own weights go in next."""
    return network.from_hparams({**hparams, "pretrained": False, "weights": None})
