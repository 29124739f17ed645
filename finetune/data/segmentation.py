"""DataModule for semantic segmentation from a folder of images and class-index PNG masks, or
from a manifest of (image, mask) pairs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import torch

from finetune.data.bad_images import read_guarded
from finetune.data.file_dataset import FileDataset
from finetune.data.folder_module import FolderDataModule
from finetune.data.images import read_rgb
from finetune.data.manifest import PairManifest, parse_pairs, read_table
from finetune.data.report import DataReport, segmentation_report
from finetune.data.segmentation_classes import read_class_list
from finetune.data.segmentation_folder import (
    Pair,
    existing_root,
    random_split,
    read_mask,
    scan_segmentation_folder,
)
from finetune.data.splits import SPLIT_NAMES, Splits
from finetune.data.transforms import compose_to_tensor
from finetune.preprocessing import Preprocessing

# --- transforms ------------------------------------------------------------------------------

def seg_train_transform(
    crop_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    ignore_index: int = 255,
    normalize: bool = True,
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
    return compose_to_tensor(steps, mean, std, normalize)


def mean_colour(mean: tuple[float, ...]) -> tuple[int, ...]:
    """The uint8 pixel that normalises to (about) 0: padding that adds no signal."""
    return tuple(round(255.0 * m) for m in mean)


class SegmentationDataset(FileDataset):
    """(image, mask) pairs -> {"image": CHW uint8 tensor, "mask": HW uint8 tensor, "path": str}.

    Augmentation seeded by (seed, epoch, index) like the classification ImageDataset
    (FileDataset), so the same image gets the same crop in a resumed or a DDP run, whatever
    the worker. A pair that fails to load takes the next one's place.
    """

    def __init__(self, pairs: list[Pair], transform, num_classes: int, ignore_index: int, seed: int = 0):
        super().__init__(pairs, transform, seed)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def _load(self, index: int) -> dict:
        image_path, mask_path = self.items[index]
        mask = read_guarded(read_mask, mask_path, self.num_classes, self.ignore_index)
        out = self.transform(image=read_guarded(read_rgb, image_path), mask=mask)
        return {"image": out["image"], "mask": out["mask"], "path": image_path}


class PredictImageDataset(FileDataset):
    """Images alone -> {"image", "path", "size": (H, W)}; the size lets a writer crop the padding off."""

    def __init__(self, paths: list[str], transform):
        super().__init__(paths, transform)

    def _load(self, index: int) -> dict:
        image = read_guarded(read_rgb, self.items[index])
        return {"image": self.transform(image=image)["image"], "path": self.items[index], "size": tuple(image.shape[:2])}


class PadCollate:
    """Stack items of any size: pad bottom/right to the batch's max H, W rounded up to `multiple`.

    Rounding up lets the network's total stride divide the input; the mask padding is
    `ignore_index`, so padded pixels count in neither the loss nor the metrics, and the image
    padding is `fill` (the mean colour for uint8 images). Masks stay uint8 (a PNG's class
    indices, and ignore_index, are 0..255): an eighth of int64's bytes through the workers and
    the copy to the device. A class (not a lambda) so that it pickles into spawned workers.
    """

    def __init__(self, multiple: int, ignore_index: int, fill: tuple[float, ...] = (0.0, 0.0, 0.0)):
        self.multiple = multiple
        self.ignore_index = ignore_index
        self.fill = fill

    def __call__(self, items: list[dict]) -> dict:
        height = math.ceil(max(it["image"].shape[-2] for it in items) / self.multiple) * self.multiple
        width = math.ceil(max(it["image"].shape[-1] for it in items) / self.multiple) * self.multiple
        first = items[0]["image"]
        images = torch.tensor(self.fill, dtype=first.dtype).view(1, -1, 1, 1).repeat(len(items), 1, height, width)
        for i, it in enumerate(items):
            images[i, :, : it["image"].shape[-2], : it["image"].shape[-1]] = it["image"]
        batch = {"image": images, "path": [it["path"] for it in items]}
        if "mask" in items[0]:
            masks = torch.full((len(items), height, width), self.ignore_index, dtype=torch.uint8)
            for i, it in enumerate(items):
                masks[i, : it["mask"].shape[-2], : it["mask"].shape[-1]] = it["mask"]
            batch["mask"] = masks
        if "size" in items[0]:
            batch["size"] = [it["size"] for it in items]
        if "skipped" in items[0]:  # files the workers could not read (bad_images.py)
            batch["skipped"] = [it["skipped"] for it in items]
        return batch


# --- DataModule ------------------------------------------------------------------------------

# DeepLabV3's default output stride: a smaller image gives 1x1 features (reported, not skipped).
SMALLEST_SIDE = 16
CLASS_FILES = ("classes.yaml", "classes.txt")


class SegmentationFolderDataModule(FolderDataModule):
    """Images + class-index PNG masks in `root/{images,masks}` or `root/{train,val[,test]}/{images,masks}`,
    or listed in `manifest`.

    Masks match images by relative path and stem (`images/a/x.jpg` -> `masks/a/x.png`). Classes
    come from `class_names`, `root/classes.yaml` or `root/classes.txt`, read here with every
    file header, so the CLI can link `num_classes` into the model and a bad file is skipped (or,
    with `on_bad_image: raise`, fails) before training starts. `mean` and `std` default to the
    pretrained config of `backbone`. Evaluation is at full resolution: metrics are computed on
    the labels as drawn; batches are padded in collate (PadCollate).

    `manifest` (.csv, .tsv, .jsonl or .parquet; finetune/data/manifest.py): one row per image
    with its mask and, optionally, its split; columns `image_column` (image, image_path, path,
    ...), `mask_column` (mask, mask_path, label, ...), `split_column` (split, subset, ...). `root`
    is then where relative paths start (default: the manifest's folder), and the class list is
    its classes.yaml/txt or else the manifest folder's. Rows with split val/test go there; when
    no row says val, `val_fraction` of the others is held out as for a folder, else they train.
    Bad rows are skipped and listed like bad files, or stop the run under `on_bad_image: raise`.
    """

    test_layout = "root/test/images + root/test/masks"

    def __init__(
        self,
        root: str | None = None,
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
        on_bad_image: Literal["skip", "raise"] = "skip",
        manifest: str | None = None,
        image_column: str | None = None,
        mask_column: str | None = None,
        split_column: str | None = None,
    ):
        super().__init__()
        # Lightning merges model and data hparams for the logger and refuses differing values: the
        # model's class_names are these, resolved, and linked in by the CLI; keep `None` out.
        self.save_hyperparameters(ignore=["class_names"])
        # The table, class list and settings first: a config mistake should not wait for a scan of every file.
        self.source = manifest  # named in the log line and the report instead of `root`
        if manifest is not None:
            self.pair_manifest = self._read_manifest()
            class_folder = self._manifest_class_folder(class_names)
        elif root is None:
            raise ValueError("data.root: not set; point it at a folder of images/ + masks/, "
                             "or set data.manifest to a table of image and mask paths")
        else:
            class_folder = existing_root(root)
        self._class_names, self._class_colors = read_class_list(class_folder, class_names)
        self._check_settings()
        self.preprocessing = Preprocessing.resolve(backbone, mean=mean, std=std, full_resolution=True)
        self._read_folder(min_side=SMALLEST_SIDE, mask_labels=(self.num_classes, ignore_index))

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

    # -- a manifest instead of a folder ------------------------------------------------------

    def _manifest_base(self) -> Path:
        """Where the manifest's relative paths start: `root`, or the manifest's folder."""
        hp = self.hparams
        if hp.root is None:
            return Path(hp.manifest).expanduser().parent
        root = Path(hp.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a folder; with data.manifest it is the folder relative "
                                    "paths start from (leave it out for the manifest's own folder)")
        return root

    def _read_manifest(self) -> PairManifest:
        hp = self.hparams
        return parse_pairs(read_table(hp.manifest), str(hp.manifest), self._manifest_base(),
                           image_column=hp.image_column, mask_column=hp.mask_column, split_column=hp.split_column)

    def _manifest_class_folder(self, class_names: list[str] | None) -> Path:
        """`root` when it has a class list, else the manifest's folder."""
        folders = list(dict.fromkeys([self._manifest_base(), Path(self.hparams.manifest).expanduser().parent]))
        found = [folder for folder in folders if any((folder / name).is_file() for name in CLASS_FILES)]
        if not found and class_names is None:
            raise ValueError(f"data.manifest: no class list; add classes.yaml (a list of names, index 0 first) or "
                             f"classes.txt to {' or '.join(map(str, folders))}, or pass --data.class_names [background,...]")
        return (found or folders)[0]

    def _scan_manifest(self, val_fraction: float, seed: int) -> Splits[Pair]:
        table = self.pair_manifest
        self.bad_files.reject(table.problems)  # under `raise`, the first bad row stops here
        kept = set(self.screening.keep_pairs([(image, mask) for image, mask, _ in table.pairs]))
        by_split = {name: [(i, m) for i, m, s in table.pairs if s == name and (i, m) in kept] for name in SPLIT_NAMES}
        unassigned = [(i, m) for i, m, s in table.pairs if s is None and (i, m) in kept]
        if by_split["val"]:
            by_split["train"] += unassigned
        else:  # as a folder with train/ alone, and the classification manifest: hold out val_fraction
            by_split["train"], by_split["val"] = random_split(by_split["train"] + unassigned, val_fraction, seed)
        if not by_split["train"]:
            raise ValueError(  # as a folder without one: check-data reports it as fatal
                f"data.manifest: {table.source} has no usable training pair ({len(self.bad_files.records)} skipped: "
                f"`finetune check-data` lists them); relative paths start at {self._manifest_base()} (data.root)"
            )
        return Splits(**by_split)

    # -- what FolderDataModule asks for ------------------------------------------------------

    def scan_folder(self, root: str | None, val_fraction: float, seed: int) -> Splits[Pair]:
        if self.hparams.manifest is not None:
            return self._scan_manifest(val_fraction, seed)
        return scan_segmentation_folder(root, val_fraction, seed, self.screening)

    def data_report(self) -> DataReport:
        return segmentation_report(self.source or self.hparams.root, type(self).__name__, self.splits,
                                   self.class_names, self.screening)

    def test_dataloader(self):
        if self.source is not None and not self.splits.test:
            raise ValueError(f"data.manifest: {self.source} has no row with split `test`; mark the rows to test on")
        return super().test_dataloader()

    @property
    def class_names(self) -> list[str]:
        return self._class_names  # from the class list: the splits' items carry no labels

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return self._class_colors

    @property
    def ignore_index(self) -> int:
        return self.hparams.ignore_index

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        return seg_train_transform(
            hp.crop_size, self.mean, self.std, hp.scale, hp.hflip, hp.color_jitter, hp.ignore_index, normalize=False
        )

    def input_summary(self) -> str:
        return f"crop {self.hparams.crop_size}px"

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalised images, and the uint8 masks widened on the device to the int64 that
        cross-entropy and the metrics take."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, dict) and isinstance(batch.get("mask"), torch.Tensor):
            batch["mask"] = batch["mask"].long()
        return batch

    def collate_fn(self) -> PadCollate:
        return PadCollate(self.hparams.pad_multiple, self.ignore_index, mean_colour(self.mean))

    def dataset(self, items: list[Pair], train: bool) -> SegmentationDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(items, transform, self.num_classes, self.ignore_index, self.hparams.seed)

    def predict_dataset(self, paths: list[str]) -> PredictImageDataset:
        return PredictImageDataset(paths, self.eval_transform())
