"""Find image/mask pairs of a segmentation folder, split them, and check them before training."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.data.bad_images import Problem
from finetune.data.folder import list_images
from finetune.data.splits import SPLIT_NAMES, Splits

log = logging.getLogger(__name__)

Pair = tuple[str, str]  # (image path, mask path)
MASK_MODES = ("L", "P", "1")  # one value per pixel: the class index (a palette's index, not its colour)
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened image as read_rgb will return it, without decoding pixels."""
    width, height = image.size
    # read_rgb applies the EXIF orientation; a quarter turn swaps the axes. Only look where
    # the tag is already parsed: getexif() on a PNG without it would decode the pixels.
    if "exif" in image.info or image.format == "TIFF":
        if image.getexif().get(_ORIENTATION, 1) in _SWAPS_AXES:
            width, height = height, width
    return height, width


def header_size(path: str | Path) -> tuple[tuple[int, int], str]:
    """((H, W) as read_rgb will return it, PIL mode) from the file header, without decoding pixels."""
    with Image.open(path) as image:
        return displayed_size(image), image.mode


def mask_mode_problem(mode: str) -> str:
    return (
        f"mask is a {mode} image; save class indices as a single-channel ('L') or palette ('P') PNG "
        "whose pixel values are 0..num_classes-1"
    )


def _mask_mode_error(path: str | Path, mode: str) -> str:
    return f"{path}: {mask_mode_problem(mode)}"


def read_mask(path: str | Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """HxW uint8 class indices; a palette PNG gives its indices, not its colours."""
    return decode_mask(path, path, num_classes, ignore_index)


def decode_mask(path: str | Path, source, num_classes: int, ignore_index: int) -> np.ndarray:
    """`read_mask` of `source`, a file or its bytes in a file-like object (a shard's); `path` names it."""
    with Image.open(source) as image:
        if image.mode not in MASK_MODES:
            raise ValueError(_mask_mode_error(path, image.mode))
        image = ImageOps.exif_transpose(image)  # the same turn read_rgb gives the image
        mask = np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    # max() first: the common case (all values valid) costs one pass, no histogram.
    if mask.max() >= num_classes:
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(counts) if v >= num_classes and v != ignore_index]
        if bad:
            raise ValueError(
                f"{path}: mask values {[int(v) for v in bad]} are neither classes 0..{num_classes - 1} "
                f"nor data.ignore_index {ignore_index}; fix the mask or the class list"
            )
    return mask


def _missing_mask(image: str, mask: str) -> str:
    others = sorted(p.name for p in Path(mask).parent.glob(Path(mask).stem + ".*")) if Path(mask).parent.is_dir() else []
    hint = f" (found {others[0]}: masks must be PNG, a lossy format blurs the labels)" if others else ""
    return f"no mask; expected {mask}{hint}"


def _pairs(folder: Path, screen=None) -> list[Pair]:
    """Every image under folder/images with its mask folder/masks/<same relative path>.png.

    With `screen` (the DataModule's checks), pairs with a missing or unusable file are left out
    (or raised) by its policy; without, a missing mask is an error."""
    images, masks = folder / "images", folder / "masks"
    pairs, missing = [], []
    for image in list_images(images):
        mask = (masks / image.relative_to(images)).with_suffix(".png")
        (pairs if mask.is_file() else missing).append((str(image), str(mask)))
    if screen is not None:
        screen.bad_files.reject([Problem(image, _missing_mask(image, mask), "mask") for image, mask in missing])
        return screen.keep_pairs(pairs)
    if missing:
        image, mask = missing[0]
        raise ValueError(f"data.root: no mask for {image}; {_missing_mask(image, mask)} ({len(missing)} image(s) lack a mask)")
    return pairs


def check_pairs(pairs: list[Pair]) -> None:
    """Mask mode and size against the image, from headers only: a bad file fails here, not in a worker."""
    for image, mask in pairs:
        image_size, _ = header_size(image)
        mask_size, mode = header_size(mask)
        if mode not in MASK_MODES:
            raise ValueError(_mask_mode_error(mask, mode))
        if image_size != mask_size:
            raise ValueError(
                f"{mask}: mask is {mask_size[1]}x{mask_size[0]} but its image {image} is "
                f"{image_size[1]}x{image_size[0]} (WxH); masks must match their image pixel for pixel"
            )


def random_split(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out `val_fraction` of the images (at least one when there are two or more)."""
    items = sorted(pairs)
    random.Random(seed).shuffle(items)
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = min(max(n_val, 1), len(items) - 1)
    return sorted(items[n_val:]), sorted(items[:n_val])


def existing_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; point it at root/images + root/masks")
    return root


def scan_segmentation_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0, screen=None) -> Splits[Pair]:
    """Read either layout: `root/{images,masks}` (split here) or `root/{train,val[,test]}/{images,masks}`.

    `screen` (finetune.data.screening.Screening) leaves out unusable pairs before the split."""
    root = existing_root(root)
    if (root / "train" / "images").is_dir():
        splits = Splits(*(_pairs(root / s, screen) if (root / s / "images").is_dir() else [] for s in SPLIT_NAMES))
        if not splits.val:
            splits.train, splits.val = random_split(splits.train, val_fraction, seed)
    elif (root / "images").is_dir():
        splits = Splits(*random_split(_pairs(root, screen), val_fraction, seed), test=[])
    else:
        raise ValueError(f"data.root: {root} has neither images/ + masks/ nor train/images/ + train/masks/")
    if not splits.train:
        skipped = f" ({len(screen.bad_files.records)} skipped: `finetune check-data` lists them)" if screen else ""
        raise ValueError(f"data.root: no usable training images under {root}{skipped}")
    if screen is None:
        for _, pairs in splits.items():
            check_pairs(pairs)
    return splits
