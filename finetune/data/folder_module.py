"""What every folder DataModule does: read the folder at construction, report on it, load it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.bad_images import BadFiles, SkipBadImages
from finetune.data.folder import list_image_paths
from finetune.data.loader import DataLoaderWorkers, data_loader
from finetune.data.normalize import NormalizeOnDevice
from finetune.data.report import DataReport, log_report
from finetune.data.resume import ResumePosition
from finetune.data.screening import Screening, requested
from finetune.data.screening_cache import config_key, outcome_digest, shared_screening
from finetune.data.splits import Splits
from finetune.preprocessing import Preprocessing

log = logging.getLogger(__name__)


class FolderDataModule(ResumePosition, NormalizeOnDevice, SkipBadImages, DataLoaderWorkers, L.LightningDataModule):
    """A folder of images, split into train / val [/ test], plus a folder to predict on.

    The folder is read at construction, so that the CLI can link `num_classes` and
    `class_names` into the model before it is built, and a bad file is skipped (or, with
    `on_bad_image: raise`, fails) before training starts.

    A subclass's `__init__` saves its hyperparameters (Lightning reads them from the calling
    frame: `root`, `val_fraction`, `seed`, `batch_size`, `num_workers`, `predict_root` and
    `on_bad_image` are expected), sets `self.preprocessing`, then calls `_read_folder`. It
    fills in: `scan_folder` (the splits), `data_report`, `dataset` (a split's items as a
    Dataset), `predict_dataset`, `train_transform`, `input_summary` and `test_layout` (what to
    add for a test split); `collate_fn` and `eval_transform` when the defaults do not fit.
    """

    preprocessing: Preprocessing
    splits: Splits
    test_layout: str = ""

    def _read_folder(self, min_side: int, mask_labels: tuple[int, int] | None = None) -> None:
        """Screen, split and report on `root`. `min_side`: images smaller than this are reported;
        `mask_labels`: (num_classes, ignore_index) of masks to screen."""
        hp = self.hparams
        # Unusable files are found (and skipped or raised) before the split: finetune.data.screening.
        self.bad_files = BadFiles(hp.on_bad_image)
        # What each file's screening found comes from the cache of the source (a folder, a
        # manifest, a dataset name), found by one process and checked by the others: the
        # subclass's scan_folder lists and splits as always (finetune.data.screening_cache).
        source = getattr(self, "source", None) or hp.get("root")
        request = requested()
        config = config_key(type(self).__module__, type(self).__qualname__, sorted(dict(hp).items()), mask_labels,
                            request.mode, request.min_side or min_side)
        with shared_screening(source, config, refresh=request.refresh_cache) as shared:
            self.screening = Screening(self.bad_files, min_side, mask_labels, shared)
            # .get: a DataModule with neither (ShardDataModule: its splits were made when written)
            self.splits = self.scan_folder(hp.get("root"), hp.get("val_fraction", 0.0), hp.seed)
            if shared is not None:
                shared.outcome = outcome_digest(self.splits, self.bad_files.records)
        self.report = self.data_report()
        # The cache's lock and handles stay here: ddp_spawn pickles the DataModule into its workers.
        self.screening.shared = None
        self.num_workers = hp.num_workers
        if getattr(hp, "sampler", "shuffle") == "balanced":
            self.train_labels()  # a DataModule without labels fails here, before a model is built
        log.info(
            "%s: %d classes, %d train / %d val / %d test images; %s, mean %s, std %s",
            getattr(self, "source", None) or hp.get("root"), self.num_classes, len(self.splits.train), len(self.splits.val), len(self.splits.test),
            self.input_summary(), self.mean, self.std,
        )
        log_report(self.report)

    # -- what a subclass fills in ------------------------------------------------------------

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> Splits:
        """The splits, with `self.screening` checking the files."""
        raise NotImplementedError

    def data_report(self) -> DataReport:
        raise NotImplementedError

    def dataset(self, items: list, train: bool) -> Dataset:
        """A split's items as a Dataset: augmented (`train`) or as evaluated."""
        raise NotImplementedError

    def predict_dataset(self, paths: list[str]) -> Dataset:
        raise NotImplementedError

    def train_transform(self):
        raise NotImplementedError

    def input_summary(self) -> str:
        """The input size, for the log line."""
        raise NotImplementedError

    def eval_transform(self):
        return self.preprocessing.eval_transform(normalize=False)

    def collate_fn(self):
        return None  # default_collate

    # -- settings: read-only views of the resolved preprocessing ---------------------------

    @property
    def preprocessing_config(self) -> dict:
        return self.preprocessing.to_dict()

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_labels(self) -> list[int]:
        """The class label of each train item, in order: what `sampler: balanced` draws by."""
        labels = self._train_labels()
        if labels is None:
            raise ValueError(f"data.sampler: balanced needs one class label per image; {type(self).__name__} has none")
        return labels

    @property
    def class_counts(self) -> list[int]:
        """Train images per class (length `num_classes`): for inverse-frequency class weights."""
        labels = self._train_labels()
        if labels is None:
            raise ValueError(f"{type(self).__name__} has no class label per image to count classes by")
        return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=self.num_classes).tolist()

    def _train_labels(self) -> list[int] | None:
        """Labels of (path, class index) train items; None where items carry none (segmentation's
        (image, mask) pairs: its classes are mask values)."""
        items = self.splits.train
        if not self.splits.class_names or not all(isinstance(item, tuple) and isinstance(item[1], int) for item in items):
            return None
        return [label for _, label in items]

    # -- loaders ------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return data_loader(self, dataset, shuffle, self.collate_fn())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.splits.train, train=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.splits.val, train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.splits.test:
            raise ValueError(f"data.root: {self.hparams.root} has no test/ split; add {self.test_layout}")
        return self._loader(self.dataset(self.splits.test, train=False), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        folder = self.hparams.predict_root
        if folder is None or not Path(folder).expanduser().is_dir():
            raise ValueError(f"data.predict_root: {folder!r} is not a folder; pass --data.predict_root PATH")
        paths = list_image_paths(Path(folder).expanduser())
        if not paths:
            raise ValueError(f"data.predict_root: no images under {folder}")
        return self._loader(self.predict_dataset(paths), shuffle=False)
