"""Config values that nothing rejects until training has started, checked right after parsing.

jsonargparse checks types, not ranges: `--data.batch_size 0` parses, then torch's DataLoader
raises a traceback once fit has begun, and `--trainer.accumulate_grad_batches 0` ends in a
ZeroDivisionError inside Lightning's loop. Lightning itself checks some trainer values when
the Trainer is built (`max_epochs`, `limit_*_batches`, ...): those are not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune.errors import FinetuneError


def _positive(value) -> bool:
    return value > 0


def _at_least_zero(value) -> bool:
    return value >= 0


def _fraction(value) -> bool:
    return 0 <= value < 1


def _positive_number(value) -> bool:  # val_check_interval may also be a time ("00:01:00:00")
    return not isinstance(value, (int, float)) or value > 0


# key -> (test the value passes when it is set, the fix the message gives)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.batch_size": (_positive, "images per step and device: pass a positive number, e.g. 32"),
    "data.num_workers": (_at_least_zero, "loader processes: pass 0 to load in this process, or leave it unset"),
    "data.image_size": (_positive, "input side in pixels: pass e.g. 224, or leave it unset for the backbone's"),
    "model.lr": (_positive, "the learning rate: pass a positive number, e.g. 1e-3, or find one with `finetune lr-find`"),
    "model.weight_decay": (_at_least_zero, "pass 0 for none, or a small positive number such as 0.05"),
    "model.dropout": (_fraction, "a probability: pass a number from 0 (none) to below 1, e.g. 0.2"),
    "trainer.accumulate_grad_batches": (_positive, "batches per optimizer step: pass 1 or more"),
    "trainer.check_val_every_n_epoch": (_positive, "pass 1 to validate after every epoch, or null to validate by "
                                                   "trainer.val_check_interval only"),
    "trainer.val_check_interval": (_positive_number, "pass a fraction of an epoch in (0, 1], or a number of batches"),
}


def _value(config, key: str):
    """The value of `key` (`data.batch_size`) in the parsed config, None if unset or absent."""
    section, _, name = key.partition(".")
    node = config.get(section)
    if node is not None and node.get("init_args") is not None:  # model and data: class_path + init_args
        node = node.init_args
    return None if node is None else node.get(name)


def check_values(config) -> None:
    """Raise FinetuneError, naming the key and the fix, for the first value outside its range."""
    for key, (valid, fix) in RULES.items():
        value = _value(config, key)
        if value is not None and not isinstance(value, bool) and not valid(value):
            raise FinetuneError(f"{key}: {value!r} is out of range; {fix}")
