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


def _probability(value) -> bool:
    return 0 <= value <= 1


def _magnitude(value) -> bool:  # RandAugment's 31 levels
    return 0 <= value <= 30


def _positive_or_auto(value) -> bool:
    return value == "auto" or value > 0


def _positive_number(value) -> bool:  # val_check_interval may also be a time ("00:01:00:00")
    return not isinstance(value, (int, float)) or value > 0


# key -> (test the value passes when it is set, the fix the message gives)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.batch_size": (_positive, "images per step and device: pass a positive number, e.g. 32"),
    "data.num_workers": (_at_least_zero, "loader processes: pass 0 to load in this process, or leave it unset"),
    "data.image_size": (_positive, "input side in pixels: pass e.g. 224, or leave it unset for the backbone's"),
    "data.augment_ops": (_positive, "RandAugment's operations per image: pass 1 or more, e.g. 2"),
    "data.augment_magnitude": (_magnitude, "RandAugment's strength: pass 0 (none) to 30, e.g. 9"),
    "data.random_erasing": (_probability, "the chance to erase a box of a training image: pass 0 (off) to 1, "
                                          "e.g. 0.25"),
    "model.lr": (_positive_or_auto, "the learning rate: pass a positive number, e.g. 1e-3, or auto to find one with the "
                                    "LR range test first"),
    "model.weight_decay": (_at_least_zero, "pass 0 for none, or a small positive number such as 0.05"),
    "model.dropout": (_fraction, "a probability: pass a number from 0 (none) to below 1, e.g. 0.2"),
    "model.label_smoothing": (_fraction, "the share of each target spread over all classes: pass 0 (none) to below 1, "
                                         "e.g. 0.1"),
    "model.mixup": (_at_least_zero, "Mixup's Beta alpha: pass 0 (off) or a positive number, e.g. 0.8"),
    "model.cutmix": (_at_least_zero, "CutMix's Beta alpha: pass 0 (off) or a positive number, e.g. 1.0"),
    "model.mixup_prob": (_probability, "the chance a batch is mixed: pass 0 to 1, e.g. 1.0"),
    "model.mixup_switch_prob": (_probability, "CutMix's share when both are on: pass 0 to 1, e.g. 0.5"),
    "model.mixup_off_epochs": (_at_least_zero, "final epochs without mixing: pass 0 (mix to the end) or more"),
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


def _problem(key: str, value) -> str | None:
    valid, fix = RULES[key]
    if value is not None and not isinstance(value, bool) and not valid(value):
        return f"{key}: {value!r} is out of range; {fix}"
    return None


def check_values(config) -> None:
    """Raise FinetuneError, naming the key and the fix, for the first value outside its range."""
    for key in RULES:
        problem = _problem(key, _value(config, key))
        if problem:
            raise FinetuneError(problem)


def check_value(key: str, value) -> None:
    """The same check for one value where it is used (a DataModule built in Python, not by the
    CLI): ValueError, with the same one-line message."""
    problem = _problem(key, value)
    if problem:
        raise ValueError(problem)
