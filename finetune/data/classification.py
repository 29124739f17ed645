"""DataModule for image classification from a folder of class sub-folders."""

from __future__ import annotations

from typing import Literal

import torch

from finetune.data.bad_images import read_guarded
from finetune.data.crop_first import CropFirst
from finetune.data.file_dataset import FileDataset
from finetune.data.folder import Sample, scan_image_folder
from finetune.data.folder_module import FolderDataModule
from finetune.data.images import Shrink, decode_rgb, read_bytes
from finetune.data.report import DataReport, folder_report
from finetune.data.splits import Splits
from finetune.data.transforms import Augment, Crop, CropShrink, ResizeShrink, train_transform
from finetune.preprocessing import Preprocessing
from finetune.value_checks import check_value


class ImageDataset(FileDataset):
    """(path, label) pairs -> {"image": CHW tensor, "label": int, "path": str, "index": int}.

    Augmentation seeded by (seed, epoch, index) (FileDataset), policies included
    (finetune.data.augment). A transform that starts with RandomResizedCrop runs crop first
    (`crop_first`, the default): only the crop of a JPEG is decoded, with the same result as
    the Compose on the whole image.

    `num_labels`: labels are tuples of label indices (multi-label), given as multi-hot float
    vectors of this length.
    """

    def __init__(
        self, samples: list[Sample], transform, seed: int = 0, shrink: Shrink | None = None, crop_first: bool = True,
        num_labels: int | None = None,
    ):
        super().__init__(samples, transform, seed)
        self.shrink = shrink  # how far JPEG decoding may reduce an image (see read_rgb)
        self.crop_first = CropFirst(transform) if crop_first and CropFirst.applies(transform) else None
        self.num_labels = num_labels

    def _load(self, index: int) -> dict:
        path, label = self.items[index]
        return self._sample(index, path, read_guarded(read_bytes, path), label)

    def _sample(self, index: int, path: str, data: bytes, label) -> dict:
        """The item from an image's encoded bytes (a file's, or a shard's: finetune.data.shards)."""
        if self.crop_first is not None:
            image = self.crop_first.finish(read_guarded(self.crop_first.read_bytes, path, data, self.shrink))
        else:
            image = self.transform(image=read_guarded(decode_rgb, path, data, self.shrink))["image"]
        if self.num_labels is not None:
            label = torch.zeros(self.num_labels).index_fill_(0, torch.tensor(label, dtype=torch.long), 1.0)
        return {"image": image, "label": label, "path": path, "index": index}


class ImageFolderDataModule(FolderDataModule):
    """Images in `root/<class>/*` or `root/{train,val[,test]}/<class>/*`.

    Classes are read here, at construction, so that the CLI can link `num_classes` and
    `class_names` into the model before it is built. `image_size`, `mean`, `std`, `crop_pct`
    and `interpolation` default to the pretrained config of `backbone` (linked from the model).

    Training augmentation:

    - `crop`: "random_resized" (default) trains on RandomResizedCrop over `scale` of the image's
      area and evaluates timm's way (short side to image_size / crop_pct, centre crop);
      "whole" trains and evaluates on the whole image squashed to image_size x image_size
      (aspect not kept; `scale` and `crop_pct` unused): for images whose evidence may lie at
      the border (inspection photos), which crops cut off. Export and `predict --exported`
      evaluate the same way (Preprocessing.resize_mode).
    - `hflip`: the chance of a horizontal flip.
    - `augment`: "light" (default): crop and flip only. "randaugment", "trivialaugment",
      "autoaugment": torchvision's RandAugment, TrivialAugmentWide, AutoAugment (ImageNet
      policy), after crop and flip. `augment_ops` (operations per image, default 2) and
      `augment_magnitude` (0-30, default 9) set RandAugment's strength; the other two
      policies have fixed strengths and ignore them.
    - `random_erasing`: the chance (0-1) to erase one box of a training image to the mean
      colour (timm's "const" mode; 0 after normalisation), after the policy. timm's recipes
      use 0.25.
    - `sampler`: "shuffle" (default): every image once an epoch, in a seeded order;
      "balanced": each class drawn equally often, see finetune/data/sampling.py.

    All of it is a function of (seed, epoch, index): a resumed or multi-GPU run augments each
    image as a single uninterrupted run would.
    """

    test_layout = "root/test/<class>/*"

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
        crop: Crop = "random_resized",
        augment: Augment = "light",
        augment_ops: int = 2,
        augment_magnitude: int = 9,
        random_erasing: float = 0.0,
        sampler: Literal["shuffle", "balanced"] = "shuffle",
    ):
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("augment_ops", augment_ops), ("augment_magnitude", augment_magnitude),
                           ("random_erasing", random_erasing)):
            check_value(f"data.{key}", value)
        for key, value, allowed in (("crop", crop, Crop), ("augment", augment, Augment)):
            if value not in allowed.__args__:  # the CLI's types say so too; this is for Python callers
                raise ValueError(f"data.{key}: {value!r} is not one of {', '.join(allowed.__args__)}")
        # Kept here, not read back from self.hparams: a subclass (IdentityFolderDataModule) saves
        # its own signature's hyperparameters, which need not have these.
        self.augmentation = dict(crop=crop, augment=augment, augment_ops=augment_ops,
                                 augment_magnitude=augment_magnitude, random_erasing=random_erasing)
        self.preprocessing = Preprocessing.resolve(
            backbone, image_size=image_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
            resize_mode="squash" if crop == "whole" else "crop",
        )
        self._read_folder(min_side=self.image_size)

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> Splits[Sample]:
        """Classes and split (subclasses split differently, e.g. by identity); `self.screening` checks the files."""
        return scan_image_folder(root, val_fraction, seed, self.screening)

    def data_report(self) -> DataReport:
        crop = (self.augmentation["crop"], self.crop_pct)  # for its advice on far-from-square images
        return folder_report(self.hparams.root, type(self).__name__, self.splits, self.screening, crop)

    @property
    def image_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def crop_pct(self) -> float:
        return self.preprocessing.crop_pct

    @property
    def interpolation(self) -> str:
        return self.preprocessing.interpolation

    def input_summary(self) -> str:
        return f"input {self.image_size}px"

    def train_transform(self):
        hp = self.hparams
        return train_transform(
            self.image_size, self.mean, self.std, hp.scale, hp.hflip, self.interpolation, normalize=False, **self.augmentation
        )

    def train_shrink(self) -> Shrink:
        if self.augmentation["crop"] == "whole":  # squashed to image_size: neither side may go below it
            return ResizeShrink(self.image_size)
        return CropShrink(self.image_size, self.hparams.scale[0])

    def eval_shrink(self) -> Shrink:
        return self.preprocessing.eval_shrink()

    # Items carry a tuple of label indices, trained as multi-hot targets (ManifestDataModule,
    # ShardDataModule set it from their data).
    multilabel = False

    @property
    def num_labels(self) -> int | None:
        """The multi-hot target length of multi-label items; None for a class index per item."""
        return self.num_classes if self.multilabel else None

    @property
    def label_counts(self) -> list[int]:
        """Training images per label (positives): for `pos_weight: auto`."""
        return label_positives(self.splits.train, self.num_classes)

    def dataset(self, items: list[Sample], train: bool) -> ImageDataset:
        transform, shrink = (self.train_transform(), self.train_shrink()) if train else (self.eval_transform(), self.eval_shrink())
        return ImageDataset(items, transform, self.hparams.seed, shrink, num_labels=self.num_labels)

    def predict_dataset(self, paths: list[str]) -> ImageDataset:
        """Image files (`data.predict_root`), whatever the training data is stored as."""
        items = [(path, () if self.multilabel else -1) for path in paths]
        return ImageDataset(items, self.eval_transform(), self.hparams.seed, self.eval_shrink(), num_labels=self.num_labels)


def label_positives(items: list, num_classes: int) -> list[int]:
    """Items per label: a class index counts once, a multi-label item once for each of its labels."""
    counts = [0] * num_classes
    for _, labels in items:
        for label in labels if isinstance(labels, tuple) else (labels,):
            counts[label] += 1
    return counts
