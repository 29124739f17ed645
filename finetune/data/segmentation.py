"""DataModule for semantic segmentation from a folder of images and class-index PNG masks."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
import yaml
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from finetune.backbones import data_config
from finetune.data.sampling import default_num_workers, seeded_index, train_sampler
from finetune.data.folder import list_images
from finetune.data.images import read_rgb

log = logging.getLogger(__name__)

Pair = tuple[str, str]  # (image path, mask path)
SPLIT_NAMES = ("train", "val", "test")
MASK_MODES = ("L", "P", "1")  # one value per pixel: the class index (a palette's index, not its colour)
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


# --- classes ---------------------------------------------------------------------------------

def default_palette(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC's colour map: distinct, stable for any n, background (index 0) black."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= ((c >> 0) & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


def _colour(value, name: str, source: Path) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{source}: colour of {name!r} must be [r, g, b] with values 0..255, got {value!r}")
    return tuple(value)


def _entry(item, source: Path) -> tuple[str, tuple[int, int, int] | None]:
    """A class entry is a name, or {name: ..., color: [r, g, b]}."""
    if isinstance(item, dict):
        if "name" not in item:
            raise ValueError(f"{source}: class entry {item!r} has no 'name'; write {{name: cat, color: [r, g, b]}}")
        return str(item["name"]), _colour(item.get("color", item.get("colour")), str(item["name"]), source)
    return str(item), None


def _read_classes_yaml(path: Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    content = yaml.safe_load(path.read_text())
    if isinstance(content, list):
        return [_entry(item, path) for item in content]
    if isinstance(content, dict):
        # {index: name}: the indices are the mask values, so they must cover 0..N-1 exactly.
        try:
            by_index = {int(k): v for k, v in content.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{path}: a mapping must be {{index: name}} with integer indices, got keys {list(content)}") from None
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise ValueError(f"{path}: class indices must run 0..{len(by_index) - 1} without gaps; missing {missing}")
        return [_entry(by_index[i], path) for i in range(len(by_index))]
    raise ValueError(f"{path}: expected a list of class names, a list of {{name, color}} or a mapping {{index: name}}")


def read_class_list(root: Path, class_names: list[str] | None) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Names and colours from the argument, root/classes.yaml or root/classes.txt, in that order."""
    if class_names is not None:
        entries = [(str(name), None) for name in class_names]
        source = "data.class_names"
    elif (root / "classes.yaml").is_file():
        source = root / "classes.yaml"
        entries = _read_classes_yaml(source)
    elif (root / "classes.txt").is_file():
        source = root / "classes.txt"
        entries = [(line.strip(), None) for line in source.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(
            f"data.root: {root} has no class list; add classes.yaml (a list of names, index 0 first) "
            "or classes.txt (one name per line), or pass --data.class_names [background,...]"
        )
    names = [name for name, _ in entries]
    if len(names) < 2:
        raise ValueError(f"{source}: {len(names)} class(es); a segmenter needs at least 2 (e.g. background and one more)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: class names {duplicates} appear more than once")
    palette = default_palette(len(names))
    colours = [colour or palette[i] for i, (_, colour) in enumerate(entries)]
    return names, colours


# --- files -----------------------------------------------------------------------------------

def header_size(path: str | Path) -> tuple[tuple[int, int], str]:
    """((H, W) as read_rgb will return it, PIL mode) from the file header, without decoding pixels."""
    with Image.open(path) as image:
        width, height = image.size
        # read_rgb applies the EXIF orientation; a quarter turn swaps the axes. Only look where
        # the tag is already parsed: getexif() on a PNG without it would decode the pixels.
        if "exif" in image.info or image.format == "TIFF":
            if image.getexif().get(_ORIENTATION, 1) in _SWAPS_AXES:
                width, height = height, width
        return (height, width), image.mode


def _mask_mode_error(path: str | Path, mode: str) -> str:
    return (
        f"{path}: mask is a {mode} image; save class indices as a single-channel ('L') or palette ('P') PNG "
        "whose pixel values are 0..num_classes-1"
    )


def read_mask(path: str | Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """HxW uint8 class indices; a palette PNG gives its indices, not its colours."""
    with Image.open(path) as image:
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


def _pairs(folder: Path) -> list[Pair]:
    """Every image under folder/images with its mask folder/masks/<same relative path>.png."""
    images, masks = folder / "images", folder / "masks"
    pairs, missing = [], []
    for image in list_images(images):
        mask = (masks / image.relative_to(images)).with_suffix(".png")
        (pairs if mask.is_file() else missing).append((str(image), str(mask)))
    if missing:
        image, mask = missing[0]
        others = sorted(p.name for p in Path(mask).parent.glob(Path(mask).stem + ".*")) if Path(mask).parent.is_dir() else []
        hint = f" (found {others[0]}: masks must be PNG, a lossy format blurs the labels)" if others else ""
        raise ValueError(f"data.root: no mask for {image}; expected {mask}{hint} ({len(missing)} image(s) lack a mask)")
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


def scan_segmentation_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[Pair]]:
    """Read either layout: `root/{images,masks}` (split here) or `root/{train,val[,test]}/{images,masks}`."""
    root = existing_root(root)
    if (root / "train" / "images").is_dir():
        splits = {s: _pairs(root / s) if (root / s / "images").is_dir() else [] for s in SPLIT_NAMES}
        if not splits["val"]:
            splits["train"], splits["val"] = random_split(splits["train"], val_fraction, seed)
    elif (root / "images").is_dir():
        train, val = random_split(_pairs(root), val_fraction, seed)
        splits = {"train": train, "val": val, "test": []}
    else:
        raise ValueError(f"data.root: {root} has neither images/ + masks/ nor train/images/ + train/masks/")
    if not splits["train"]:
        raise ValueError(f"data.root: no training images under {root}")
    for pairs in splits.values():
        check_pairs(pairs)
    return splits


# --- transforms ------------------------------------------------------------------------------

def seg_train_transform(
    crop_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    ignore_index: int = 255,
) -> A.Compose:
    # Colour first, on the image as loaded: jitter after padding would tint the padding too.
    # No hue shift: in many data sets colour is what tells the classes apart.
    steps = []
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=1.0))
    # Scale jitter, then pad and crop. Masks are resized with nearest: a blended label would be
    # another class. Mask padding is ignore_index, so it adds no labels; image padding is the mean
    # colour, which normalises to 0, the value PadCollate pads evaluation batches with.
    steps += [
        A.RandomScale(
            scale_limit=(scale[0] - 1.0, scale[1] - 1.0),
            interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=1.0,
        ),
        A.PadIfNeeded(
            crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT,
            fill=tuple(255.0 * m for m in mean), fill_mask=ignore_index,
        ),
        A.RandomCrop(crop_size, crop_size),
        A.HorizontalFlip(p=hflip),
    ]
    return A.Compose([*steps, A.Normalize(mean=mean, std=std), ToTensorV2()])


def seg_eval_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """Full resolution: metrics are computed on the labels as drawn; batches are padded in collate."""
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])


class SegmentationDataset(Dataset):
    """(image, mask) pairs -> {"image": CHW float tensor, "mask": HW long tensor, "path": str}.

    Indexed by `(index, epoch)` (from EpochShuffleSampler) like the classification ImageDataset,
    so the same image gets the same crop in a resumed or a DDP run, whatever the worker.
    """

    def __init__(self, pairs: list[Pair], transform, num_classes: int, ignore_index: int, seed: int = 0):
        self.pairs = pairs
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = seeded_index(self.transform, self.seed, key)
        image_path, mask_path = self.pairs[index]
        mask = read_mask(mask_path, self.num_classes, self.ignore_index)
        out = self.transform(image=read_rgb(image_path), mask=mask)
        return {"image": out["image"], "mask": out["mask"].long(), "path": image_path}


class PredictImageDataset(Dataset):
    """Images alone -> {"image", "path", "size": (H, W)}; the size lets a writer crop the padding off."""

    def __init__(self, paths: list[str], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb(self.paths[index])
        return {"image": self.transform(image=image)["image"], "path": self.paths[index], "size": tuple(image.shape[:2])}


class PadCollate:
    """Stack items of any size: pad bottom/right to the batch's max H, W rounded up to `multiple`.

    Rounding up lets the network's total stride divide the input; the mask padding is
    `ignore_index`, so padded pixels count in neither the loss nor the metrics. A class (not a
    lambda) so that it pickles into spawned workers.
    """

    def __init__(self, multiple: int, ignore_index: int):
        self.multiple = multiple
        self.ignore_index = ignore_index

    def __call__(self, items: list[dict]) -> dict:
        height = math.ceil(max(it["image"].shape[-2] for it in items) / self.multiple) * self.multiple
        width = math.ceil(max(it["image"].shape[-1] for it in items) / self.multiple) * self.multiple
        images = items[0]["image"].new_zeros((len(items), items[0]["image"].shape[0], height, width))
        for i, it in enumerate(items):
            images[i, :, : it["image"].shape[-2], : it["image"].shape[-1]] = it["image"]
        batch = {"image": images, "path": [it["path"] for it in items]}
        if "mask" in items[0]:
            masks = torch.full((len(items), height, width), self.ignore_index, dtype=torch.long)
            for i, it in enumerate(items):
                masks[i, : it["mask"].shape[-2], : it["mask"].shape[-1]] = it["mask"]
            batch["mask"] = masks
        if "size" in items[0]:
            batch["size"] = [it["size"] for it in items]
        return batch


# --- DataModule ------------------------------------------------------------------------------

class SegmentationFolderDataModule(L.LightningDataModule):
    """Images + class-index PNG masks in `root/{images,masks}` or `root/{train,val[,test]}/{images,masks}`.

    Masks match images by relative path and stem (`images/a/x.jpg` -> `masks/a/x.png`). Classes
    come from `class_names`, `root/classes.yaml` or `root/classes.txt`, read here with every
    file header, so the CLI can link `num_classes` into the model and a bad file fails before
    training starts. `mean` and `std` default to the pretrained config of `backbone`.
    """

    def __init__(
        self,
        root: str,
        backbone: str = "resnet50",
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int | None = None,
        crop_size: int = 512,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pad_multiple: int = 32,
        predict_root: str | None = None,
    ):
        super().__init__()
        # Lightning merges model and data hparams for the logger and refuses differing values: the
        # model's class_names are these, resolved, and linked in by the CLI; keep `None` out.
        self.save_hyperparameters(ignore=["class_names"])
        # Class list and settings first: a config mistake should not wait for a scan of every file.
        self._class_names, self._class_colors = read_class_list(existing_root(root), class_names)
        self._check_settings()
        self.splits = scan_segmentation_folder(root, val_fraction, seed)
        pretrained = data_config(backbone)
        self.mean = tuple(mean or pretrained["mean"])
        self.std = tuple(std or pretrained["std"])
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        log.info(
            "%s: %d classes, %d train / %d val / %d test images; crop %dpx, mean %s, std %s",
            root, self.num_classes, len(self.splits["train"]), len(self.splits["val"]), len(self.splits["test"]),
            crop_size, self.mean, self.std,
        )

    def _check_settings(self) -> None:
        hp = self.hparams
        if not 0 <= hp.ignore_index <= 255 or hp.ignore_index < self.num_classes:
            raise ValueError(
                f"data.ignore_index: {hp.ignore_index} must be a value a PNG mask holds (0..255) and not a class "
                f"index (0..{self.num_classes - 1}); the usual value is 255"
            )
        if hp.crop_size < 1 or hp.pad_multiple < 1:
            raise ValueError(f"data.crop_size / data.pad_multiple: must be >= 1, got {hp.crop_size} / {hp.pad_multiple}")
        if not 0 < hp.scale[0] <= hp.scale[1]:
            raise ValueError(f"data.scale: {tuple(hp.scale)} must be (low, high) with 0 < low <= high, e.g. (0.5, 2.0)")

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return self._class_colors

    @property
    def ignore_index(self) -> int:
        return self.hparams.ignore_index

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        return seg_train_transform(hp.crop_size, self.mean, self.std, hp.scale, hp.hflip, hp.color_jitter, hp.ignore_index)

    def eval_transform(self) -> A.Compose:
        return seg_eval_transform(self.mean, self.std)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=train_sampler(self, dataset) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle and len(dataset) > self.hparams.batch_size,
            collate_fn=PadCollate(self.hparams.pad_multiple, self.ignore_index),
        )

    def _dataset(self, split: str, transform) -> SegmentationDataset:
        return SegmentationDataset(self.splits[split], transform, self.num_classes, self.ignore_index, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", self.train_transform()), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.eval_transform()), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.splits["test"]:
            raise ValueError(f"data.root: {self.hparams.root} has no test/ split; add root/test/images + root/test/masks")
        return self._loader(self._dataset("test", self.eval_transform()), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        folder = self.hparams.predict_root
        if folder is None or not Path(folder).expanduser().is_dir():
            raise ValueError(f"data.predict_root: {folder!r} is not a folder; pass --data.predict_root PATH")
        paths = [str(p) for p in list_images(Path(folder).expanduser())]
        if not paths:
            raise ValueError(f"data.predict_root: no images under {folder}")
        return self._loader(PredictImageDataset(paths, self.eval_transform()), shuffle=False)
