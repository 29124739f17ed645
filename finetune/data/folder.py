"""Find the images and classes of a user's folder, and split them for validation."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from finetune.data.images import IMAGE_EXTENSIONS, is_image_file

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (path, class index)
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class FolderSplits:
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; other files are counted and logged."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if is_image_file(p)]
    skipped = len(files) - len(images)
    if skipped:
        log.info("%s: skipped %d files that are not images (%s)", folder, skipped, ", ".join(sorted(IMAGE_EXTENSIONS)))
    return images


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _samples(folder: Path, class_names: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for class_dir in class_folders(folder):
        if class_dir.name not in index:
            raise ValueError(
                f"data.root: {class_dir} is a class the train split does not have; "
                f"add {class_dir.name}/ to train/ or remove it"
            )
        samples += [(str(p), index[class_dir.name]) for p in list_images(class_dir)]
    return samples


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of every class (at least one image when a class has two or more)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction)
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


def scan_image_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> FolderSplits:
    """Read either layout: `root/<class>/*` (split here) or `root/{train,val[,test]}/<class>/*`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; point it at root/<class>/* images")
    if (root / "train").is_dir():
        class_names = [p.name for p in class_folders(root / "train")]
        splits = {s: _samples(root / s, class_names) if (root / s).is_dir() else [] for s in SPLIT_NAMES}
        if not splits["val"]:
            splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    else:
        class_names = [p.name for p in class_folders(root)]
        train, val = stratified_split(_samples(root, class_names), val_fraction, seed)
        splits = {"train": train, "val": val, "test": []}
    if len(class_names) < 2:
        raise ValueError(f"data.root: {root} has {len(class_names)} class folder(s); a classifier needs at least 2")
    counts = [0] * len(class_names)
    for _, label in splits["train"]:
        counts[label] += 1
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        raise ValueError(f"data.root: class folder(s) {empty} under {root} have no training images")
    return FolderSplits(class_names, splits["train"], splits["val"], splits["test"])
