"""The train / val / test items of a data folder, one type for every task."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

SPLIT_NAMES = ("train", "val", "test")
Item = TypeVar("Item")  # (path, class index) for classification and identities, (image, mask) for segmentation


@dataclass
class Splits(Generic[Item]):
    """`class_names`: what the labels of the items index; empty where the items carry no label
    (segmentation: the classes are the mask values, named by the class list). `val_names`:
    identities, whose validation split has identities of its own (labels index these)."""

    train: list[Item]
    val: list[Item]
    test: list[Item]
    class_names: list[str] = field(default_factory=list)
    val_names: list[str] | None = None

    def items(self) -> Iterator[tuple[str, list[Item]]]:
        """(split name, its items), in SPLIT_NAMES order."""
        return ((name, getattr(self, name)) for name in SPLIT_NAMES)
