"""DataModule for image classification from a folder of class sub-folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from finetune.backbones import data_config
from finetune.data.bad_images import (
    BadFiles,
    SkipBadImages,
    load_or_replace,
    read_guarded,
)
from finetune.data.checks import Screening, folder_report, log_report
from finetune.data.crop_first import CropFirst
from finetune.data.folder import FolderSplits, Sample, list_images, scan_image_folder
from finetune.data.images import Shrink, read_rgb
from finetune.data.loader import DataLoaderWorkers, data_loader
from finetune.data.normalize import NormalizeOnDevice
from finetune.data.sampling import seeded_index
from finetune.data.transforms import (
    CropShrink,
    ResizeShrink,
    eval_resize,
    eval_transform,
    train_transform,
)

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """(path, label) pairs -> {"image": CHW tensor, "label": int, "path": str, "index": int}.

    Indexed by `(index, epoch)` (from EpochShuffleSampler), random augmentation is seeded by
    (seed, epoch, index): the same image gets the same crop in a resumed or a DDP run,
    whatever the worker that loads it. A transform that starts with RandomResizedCrop runs
    crop first (`crop_first`, the default): only the crop of a JPEG is decoded, with the same
    result as the Compose on the whole image.
    """

    def __init__(
        self, samples: list[Sample], transform, seed: int = 0, shrink: Shrink | None = None, crop_first: bool = True
    ):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.shrink = shrink  # how far JPEG decoding may reduce an image (see read_rgb)
        self.crop_first = CropFirst(transform) if crop_first and CropFirst.applies(transform) else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = seeded_index(self.transform, self.seed, key)
        # A file that fails here takes the next one's place; the batch names it (bad_images.py).
        return load_or_replace(self._load, index, len(self.samples))

    def _load(self, index: int) -> dict:
        path, label = self.samples[index]
        if self.crop_first is not None:
            image = self.crop_first.finish(read_guarded(self.crop_first.read, path, self.shrink))
        else:
            image = self.transform(image=read_guarded(read_rgb, path, self.shrink))["image"]
        return {"image": image, "label": label, "path": path, "index": index}


class ImageFolderDataModule(NormalizeOnDevice, SkipBadImages, DataLoaderWorkers, L.LightningDataModule):
    """Images in `root/<class>/*` or `root/{train,val[,test]}/<class>/*`.

    Classes are read here, at construction, so that the CLI can link `num_classes` and
    `class_names` into the model before it is built. `image_size`, `mean`, `std`, `crop_pct`
    and `interpolation` default to the pretrained config of `backbone` (linked from the model).
    """

    def __init__(
        self,
        root: str,
        backbone: str = "resnet50",
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        scale: tuple[float, float] = (0.25, 1.0),
        hflip: float = 0.5,
        predict_root: str | None = None,
        on_bad_image: Literal["skip", "raise"] = "skip",
    ):
        super().__init__()
        self.save_hyperparameters()
        pretrained = data_config(backbone)
        self.image_size = image_size or pretrained["input_size"][-1]
        # Unusable files are found (and skipped or raised) before the split: finetune.data.checks.
        self.bad_files = BadFiles(on_bad_image)
        self.screening = Screening(self.bad_files, min_side=self.image_size)
        self.splits = self.scan_folder(root, val_fraction, seed)
        self.report = folder_report(root, type(self).__name__, self.splits, self.screening)
        self.mean = tuple(mean or pretrained["mean"])
        self.std = tuple(std or pretrained["std"])
        self.crop_pct = crop_pct or pretrained["crop_pct"]
        self.interpolation = interpolation or pretrained["interpolation"]
        self.num_workers = num_workers
        log.info(
            "%s: %d classes, %d train / %d val / %d test images; input %dpx, mean %s, std %s",
            root, self.num_classes, len(self.splits.train), len(self.splits.val), len(self.splits.test),
            self.image_size, self.mean, self.std,
        )
        log_report(self.report)

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> FolderSplits:
        """Classes and split (subclasses split differently, e.g. by identity); `self.screening` checks the files."""
        return scan_image_folder(root, val_fraction, seed, self.screening)

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    def train_transform(self):
        return train_transform(
            self.image_size, self.mean, self.std, self.hparams.scale, self.hparams.hflip, self.interpolation, normalize=False
        )

    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation, normalize=False)

    def train_shrink(self) -> Shrink:
        return CropShrink(self.image_size, self.hparams.scale[0])

    def eval_shrink(self) -> Shrink:
        return ResizeShrink(eval_resize(self.image_size, self.crop_pct))

    def _loader(self, samples: list[Sample], transform, shuffle: bool) -> DataLoader:
        dataset = ImageDataset(samples, transform, self.hparams.seed, self.train_shrink() if shuffle else self.eval_shrink())
        return data_loader(self, dataset, shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.train_transform(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.eval_transform(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.splits.test:
            raise ValueError(f"data.root: {self.hparams.root} has no test/ split; add root/test/<class>/*")
        return self._loader(self.splits.test, self.eval_transform(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        folder = self.hparams.predict_root
        if folder is None or not Path(folder).is_dir():
            raise ValueError(f"data.predict_root: {folder!r} is not a folder; pass --data.predict_root PATH")
        samples = [(str(p), -1) for p in list_images(Path(folder))]
        if not samples:
            raise ValueError(f"data.predict_root: no images under {folder}")
        return self._loader(samples, self.eval_transform(), shuffle=False)
