"""Find the images and classes of a user's folder, and split them for validation."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from finetune.data.images import IMAGE_EXTENSIONS
from finetune.data.splits import SPLIT_NAMES, Splits

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (path, class index)


def list_images(folder: Path) -> list[Path]:
    """`list_image_paths` as Paths."""
    return [Path(p) for p in list_image_paths(folder)]


def list_image_paths(folder: str | Path) -> list[str]:
    """Image files under `folder`, recursively, in a stable order; other files are counted and logged.

    Linked folders are followed (once: a link back up does not loop), hidden folders are not.
    A broken link with an image name is listed, so that the checks report it.

    Strings, not Paths, and in the order Paths sort in (by path components, so the splits drawn
    from it are the ones Paths gave): each folder's entries sorted by name, a sub-folder's
    files where its name falls. At 1M files, building and sorting Path objects took 6 of 18 s.
    """
    images: list[str] = []
    skipped = _walk(os.fspath(folder), images, set())
    if skipped:
        log.info("%s: skipped %d files that are not images (%s)", folder, skipped, ", ".join(sorted(IMAGE_EXTENSIONS)))
    return images


def _walk(directory: str, images: list[str], seen: set[str]) -> int:
    """Append the images under `directory` to `images` in Path order; the other files counted."""
    real = os.path.realpath(directory)
    if real in seen:
        return 0
    seen.add(real)
    skipped = 0
    try:
        with os.scandir(directory) as scan:
            entries = sorted(((entry.name, entry.is_dir()) for entry in scan))  # is_dir follows links
    except OSError as error:  # an unreadable folder is passed over, as os.walk does, but said
        log.warning("%s: cannot be listed (%s); its images are left out", directory, error.strerror)
        return 0
    prefix = directory if directory.endswith(os.sep) else directory + os.sep
    for name, is_dir in entries:
        if is_dir:
            if not name.startswith("."):
                skipped += _walk(prefix + name, images, seen)
        elif _is_image_name(name):
            images.append(prefix + name)
        else:
            skipped += 1
    return skipped


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_EXTENSIONS


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
        samples += [(p, index[class_dir.name]) for p in list_image_paths(class_dir)]
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


def _screened(splits: dict[str, list[Sample]], class_names: list[str], top: Path, screen):
    """Leave out the files `screen` rejects, and class folders with no image at all (an empty
    folder is no class). A class whose files all fail is an error: the user meant that class."""
    good = screen.keep([path for samples in splits.values() for path, _ in samples])
    listed = Counter(label for _, label in splits["train"])
    splits_before, splits = splits, {s: [(path, label) for path, label in samples if path in good] for s, samples in splits.items()}
    readable = Counter(label for _, label in splits["train"])
    for label, name in enumerate(class_names):
        if listed[label] and not readable[label]:
            path = next(path for path, lab in splits_before["train"] if lab == label)
            why = screen.bad_files.records.get(path, ("cannot be used",))[0]
            raise ValueError(
                f"data.root: class {name!r} has no readable image: none of its {listed[label]} file(s) under "
                f"{top / name} can be used (e.g. {Path(path).name}: {why}); fix them or remove the folder"
            )
        if not listed[label]:
            screen.drop(top / name, "empty class folder: no images, so no class")
    kept = [label for label in range(len(class_names)) if readable[label]]
    new = {old: i for i, old in enumerate(kept)}
    splits = {s: [(path, new[label]) for path, label in samples if label in new] for s, samples in splits.items()}
    return splits, [class_names[label] for label in kept]


def scan_image_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0, screen=None) -> Splits[Sample]:
    """Read either layout: `root/<class>/*` (split here) or `root/{train,val[,test]}/<class>/*`.

    `screen` (finetune.data.screening.Screening) leaves out unusable files before the split."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; point it at root/<class>/* images")
    top = root / "train" if (root / "train").is_dir() else root
    class_names = [p.name for p in class_folders(top)]
    if top != root:
        splits = {s: _samples(root / s, class_names) if (root / s).is_dir() else [] for s in SPLIT_NAMES}
    else:
        splits = {"train": _samples(root, class_names), "val": [], "test": []}
    if screen is not None:
        splits, class_names = _screened(splits, class_names, top, screen)
    if not splits["val"]:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    if len(class_names) < 2:
        kind = "class folder(s) with images" if screen is not None else "class folder(s)"
        raise ValueError(f"data.root: {root} has {len(class_names)} {kind}; a classifier needs at least 2")
    counts = [0] * len(class_names)
    for _, label in splits["train"]:
        counts[label] += 1
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        raise ValueError(f"data.root: class folder(s) {empty} under {root} have no training images")
    return Splits(**splits, class_names=class_names)
