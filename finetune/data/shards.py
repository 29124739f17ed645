"""DataModules for streaming shards that `finetune prepare` wrote (LitData's optimized chunks),
on a local path or an object-store URL (`s3://...`, read through LitData's downloader and
cache).

LitData provides the storage: chunked files, download and a local cache, random access by
index. The order, the sharding across processes and resume are ours, exactly as for a folder
(finetune.data.sampling): EpochShuffleSampler draws the epoch's order from (seed, epoch),
pads it so every rank gets as many samples (every sample at least once an epoch), hands
(index, epoch) to the Dataset so augmentation is seeded by (seed, epoch, index), and resumes
mid-epoch where the checkpoint left off; evaluation leaves the padding out
(finetune.distributed). LitData's own StreamingDataLoader is not used: under DDP it drops the
last samples of every epoch (`drop_last` is forced on), and its shuffle and resume state are
its own, so a resumed or multi-GPU run would not see what a single uninterrupted run sees.
"""

from __future__ import annotations

import io
import json
from typing import Literal

from finetune.data.bad_images import BadFile, read_guarded
from finetune.data.classification import ImageDataset, ImageFolderDataModule
from finetune.data.images import decode_rgb
from finetune.data.report import DataReport, folder_report, segmentation_report
from finetune.data.segmentation import SMALLEST_SIDE, SegmentationDataset, SegmentationFolderDataModule
from finetune.data.segmentation_classes import default_palette
from finetune.data.segmentation_folder import decode_mask
from finetune.data.shard_format import (
    LABELS_FILE,
    check_local_split,
    read_meta,
    read_small_file,
    require_litdata,
    shard_url,
)
from finetune.data.splits import SPLIT_NAMES, Splits
from finetune.data.transforms import Augment, Crop
from finetune.errors import FinetuneError
from finetune.preprocessing import Preprocessing


class ShardReader:
    """The LitData datasets of a shard folder's splits, opened lazily in each process that reads
    (they hold file handles and a download thread, so a pickled copy starts without them)."""

    def __init__(self, url: str, cache_dir: str | None):
        self.url, self.cache_dir = url, cache_dir
        self._streams: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_streams": {}}

    def sample(self, key: str) -> dict:
        """The sample `key` ("<split>:<index>") names; a read that fails is a BadFile naming it."""
        split, _, position = key.partition(":")
        try:
            if split not in self._streams:
                from litdata import StreamingDataset

                # batch_decode=0: one item per read. LitData's default decodes a window of items
                # around each one, which a shuffled order throws away: 442 us an item against
                # 14 us here (random order, 16-px PNGs, this machine).
                self._streams[split] = StreamingDataset(shard_url(self.url, split), cache_dir=self.cache_dir,
                                                        batch_decode=0)
            return self._streams[split][int(position)]
        except Exception as error:  # noqa: BLE001 - a chunk LitData cannot read: skipped and named, like a file
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BadFile(f"{shard_url(self.url, split)}#{position}", reason) from None


class FromShards:
    """What both shard DataModules share: the sample keys of the splits, checked against their
    files, and the shards' dataset_id in the DataModule's state, so that resuming on other
    shards is refused in one line."""

    meta: dict

    def shard_keys(self) -> dict[str, list[str]]:
        """"<split>:<index>" of every sample, per split; a local split's index and chunks checked."""
        keys = {}
        for split in SPLIT_NAMES:
            count = self.meta["splits"].get(split, 0)
            if count:
                check_local_split(self.hparams.shards, split)
            keys[split] = [f"{split}:{i}" for i in range(count)]
        if not keys["train"] or not keys["val"]:
            raise FinetuneError(f"data.shards: {self.hparams.shards} has no train or no val split; prepare it from data "
                                "with both (data.val_fraction > 0)")
        return keys

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dataset_id": self.meta["dataset_id"]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("dataset_id")
        if saved is not None and saved != self.meta["dataset_id"]:
            raise FinetuneError(
                f"data.shards: {self.hparams.shards} holds other data (dataset_id {self.meta['dataset_id'][:12]}) than the "
                f"checkpoint was trained on ({saved[:12]}); point data.shards at those shards, or start a new run"
            )
        super().load_state_dict(state_dict)


class ShardImageDataset(ImageDataset):
    """Items `("<split>:<index>", label)`: the sample at `index` of the split's shards, decoded
    from its stored bytes (crop first for JPEGs, as from a file). The LitData dataset is opened
    lazily in each worker process (it holds file handles and a download thread)."""

    def __init__(self, url: str, cache_dir: str | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = ShardReader(url, cache_dir)

    def _load(self, index: int) -> dict:
        key, label = self.items[index]
        sample = self.streams.sample(key)
        # bytes: LitData may hand a memoryview, which libturbojpeg's ctypes call refuses.
        return self._sample(index, sample["path"], bytes(sample["image"]), label)


class ShardDataModule(FromShards, ImageFolderDataModule):
    """Classification data (single- or multi-label) from `finetune prepare` shards.

    `shards`: the folder (or `s3://...` URL) `finetune prepare` wrote. Classes, splits and the
    labels come from it; files were screened when it was written (its skipped_images.csv).
    `cache_dir`: where LitData keeps downloaded chunks of a URL (default: its own cache).
    Augmentation and sampler options are ImageFolderDataModule's.
    """

    test_layout = "a test split when running `finetune prepare`"

    def __init__(
        self,
        shards: str,
        cache_dir: str | None = None,
        backbone: str = "resnet50",
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
        require_litdata("data.shards")
        self.meta = read_meta(shards)
        if self.meta["kind"] not in ("classification", "multilabel"):
            fix = ("use finetune.data.ShardSegmentationDataModule" if self.meta["kind"] == "segmentation" else
                   "train identities from their folder")
            raise FinetuneError(f"data.shards: {shards} holds {self.meta['kind']} data; {fix}")
        self.multilabel = self.meta["kind"] == "multilabel"
        self.source = shards
        super().__init__(
            shards, backbone, 0.0, seed, batch_size, num_workers, image_size, mean, std, crop_pct, interpolation, scale,
            hflip, predict_root, on_bad_image, crop, augment, augment_ops, augment_magnitude, random_erasing, sampler,
        )

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> Splits:
        try:
            labels = json.loads(read_small_file(self.hparams.shards, LABELS_FILE))
        except ValueError as error:
            raise FinetuneError(f"data.shards: {self.hparams.shards}/{LABELS_FILE} is not readable JSON ({error}); "
                                "prepare the shards again") from None
        cast = tuple if self.multilabel else int
        split_items = {}
        for split, keys in self.shard_keys().items():
            split_labels = labels.get(split) or []
            if len(split_labels) != len(keys):
                raise FinetuneError(f"data.shards: {self.hparams.shards} lists {len(keys)} {split} samples but "
                                    f"{LABELS_FILE} has {len(split_labels)}; prepare the shards again")
            split_items[split] = [(key, cast(label)) for key, label in zip(keys, split_labels)]
        return Splits(**split_items, class_names=list(self.meta["class_names"]), val_names=self.meta.get("val_names"))

    def data_report(self) -> DataReport:
        return folder_report(str(self.source), type(self).__name__, self.splits, self.screening)

    def dataset(self, items: list, train: bool) -> ShardImageDataset:
        transform, shrink = (self.train_transform(), self.train_shrink()) if train else (self.eval_transform(), self.eval_shrink())
        return ShardImageDataset(self.hparams.shards, self.hparams.cache_dir, items, transform, self.hparams.seed, shrink,
                                 num_labels=self.num_labels)



class ShardSegmentationDataset(SegmentationDataset):
    """Items `("<split>:<index>", "<split>:<index>")`: a shard sample's image and mask bytes,
    decoded and augmented as SegmentationDataset does files."""

    def __init__(self, url: str, cache_dir: str | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = ShardReader(url, cache_dir)

    def _load(self, index: int) -> dict:
        sample = self.streams.sample(self.items[index][0])
        path, image, mask = sample["path"], bytes(sample["image"]), bytes(sample["mask"])
        mask = read_guarded(decode_mask, path, io.BytesIO(mask), self.num_classes, self.ignore_index)
        out = self.transform(image=read_guarded(decode_rgb, path, image), mask=mask)
        return {"image": out["image"], "mask": out["mask"], "path": path}


class ShardSegmentationDataModule(FromShards, SegmentationFolderDataModule):
    """Segmentation (image, mask) pairs from `finetune prepare` shards (`shards`: a folder or
    `s3://...` URL; `cache_dir`: LitData's download cache). Classes come from the shards; the
    colours are the default palette. Other options are SegmentationFolderDataModule's."""

    test_layout = "a test split when running `finetune prepare`"

    def __init__(
        self,
        shards: str,
        cache_dir: str | None = None,
        backbone: str = "resnet50",
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int | None = None,
        crop_size: int = 512,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        ignore_index: int = 255,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pad_multiple: int = 32,
        predict_root: str | None = None,
        on_bad_image: Literal["skip", "raise"] = "skip",
    ):
        require_litdata("data.shards")
        self.meta = read_meta(shards)
        if self.meta["kind"] != "segmentation":
            raise FinetuneError(f"data.shards: {shards} holds {self.meta['kind']} data; use finetune.data.ShardDataModule")
        # Past SegmentationFolderDataModule's __init__ (it reads a folder or a manifest). Through
        # super(), not FolderDataModule.__init__(self): Lightning finds the arguments to save in the
        # frames of __init__s that use super().
        super(SegmentationFolderDataModule, self).__init__()
        self.save_hyperparameters()
        self.source = shards
        self._class_names = list(self.meta["class_names"])
        self._class_colors = default_palette(len(self._class_names))
        self._check_settings()
        self.preprocessing = Preprocessing.resolve(backbone, mean=mean, std=std, full_resolution=True)
        self._read_folder(min_side=SMALLEST_SIDE, mask_labels=(self.num_classes, ignore_index))

    def scan_folder(self, root, val_fraction: float, seed: int) -> Splits:
        # (image, mask) pairs: both are the sample's, read together by ShardSegmentationDataset.
        return Splits(**{split: [(key, key) for key in keys] for split, keys in self.shard_keys().items()})

    def data_report(self) -> DataReport:
        return segmentation_report(self.source, type(self).__name__, self.splits, self.class_names, self.screening)

    def dataset(self, items: list, train: bool) -> ShardSegmentationDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return ShardSegmentationDataset(self.hparams.shards, self.hparams.cache_dir, items, transform, self.num_classes,
                                        self.ignore_index, self.hparams.seed)
