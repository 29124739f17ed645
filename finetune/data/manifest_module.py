"""DataModule for images listed in a table: a manifest file (CSV, TSV, JSONL, Parquet) or a
Hugging Face dataset, one label or several per image."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from finetune.data.classification import ImageFolderDataModule, label_positives
from finetune.data.folder import stratified_split
from finetune.data.manifest import Entry, parse_manifest, read_table
from finetune.data.multilabel_split import iterative_split
from finetune.data.report import DataReport, folder_report
from finetune.data.splits import SPLIT_NAMES, Splits
from finetune.data.transforms import Augment, Crop
from finetune.errors import FinetuneError


class ManifestDataModule(ImageFolderDataModule):
    """Images listed in `manifest` (.csv, .tsv, .jsonl or .parquet), or in the Hugging Face
    dataset `hf_dataset`: one row per image, with its path, its label(s) and, optionally, its
    split. Single-label rows train finetune.tasks.ClassificationTask; rows with several labels
    (`multilabel`) train finetune.tasks.MultiLabelClassificationTask on multi-hot targets.

    - `root`: the folder relative paths start from (default: the manifest's own folder).
    - Columns (case-insensitive; found by their usual names when not given): `path_column`
      (path, image, file, filename, ...), `label_column` (label, labels, tags, class, ...),
      or `label_columns`: one 0/1 column per label, named by the label; `split_column`
      (split, subset, ...; values train, val/valid/validation, test, or empty).
    - `label_delimiter`: what separates several labels in one cell (default: `;` or `|`,
      whichever the file uses; a space only when set). `classes`: the labels, in order (others
      are bad rows); default: every label the manifest uses, sorted.
    - `multilabel`: default: yes when any row has several labels, a delimiter is set or found,
      or `label_columns` are used.
    - Rows without a split: split off `val_fraction` per class (iterative stratification for
      multi-label, Sechidis et al. 2011) when no row says `val`, else they train.

    Bad rows (no label, an unknown split or label, a repeated path) are skipped and listed
    like bad images (`finetune check-data` shows them), or stop the run in one line under
    `on_bad_image: raise`. Augmentation options are ImageFolderDataModule's.

    `hf_dataset`: a Hub name (read through the `datasets` package: pip install
    'finetune[hf]'), or a local `save_to_disk` folder or Parquet files; `hf_config`,
    `hf_splits` ({train: ..., val: ..., test: ...}: the dataset's split names),
    `image_column`, `label_column`. Its images are written once to a cache folder as files
    (finetune/data/hf_dataset.py).
    """

    test_layout = "rows with split `test`"

    def __init__(
        self,
        manifest: str | None = None,
        root: str | None = None,
        path_column: str | None = None,
        label_column: str | None = None,
        label_columns: list[str] | None = None,
        label_delimiter: str | None = None,
        split_column: str | None = None,
        classes: list[str] | None = None,
        multilabel: bool | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_splits: dict[str, str] | None = None,
        image_column: str = "image",
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
        if (manifest is None) == (hf_dataset is None):
            raise FinetuneError("data.manifest: set either data.manifest (a CSV, TSV, JSONL or Parquet file) or "
                                "data.hf_dataset (a Hugging Face dataset), not both or neither")
        self.source = manifest or hf_dataset
        super().__init__(
            root or "", backbone, val_fraction, seed, batch_size, num_workers, image_size, mean, std, crop_pct,
            interpolation, scale, hflip, predict_root, on_bad_image, crop, augment, augment_ops, augment_magnitude,
            random_erasing, sampler,
        )

    def _rows(self) -> tuple[list[dict], Path, list[str] | None]:
        """The table's rows, the folder relative paths start from, and the dataset's own class list."""
        hp = self.hparams
        if hp.hf_dataset is not None:
            from finetune.data.hf_dataset import hf_rows

            rows, names = hf_rows(hp.hf_dataset, hp.hf_config, hp.hf_splits, hp.image_column, hp.label_column or "label")
            return rows, Path(hp.root or ".").expanduser(), names
        path = Path(hp.manifest).expanduser()
        return read_table(path), Path(hp.root).expanduser() if hp.root else path.parent, None

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> Splits:
        hp = self.hparams
        rows, base, dataset_classes = self._rows()
        # hf_rows gives every dataset's rows as {path, label, split}, whatever its own columns.
        columns = dict(path_column="path", label_column="label", split_column="split") if hp.hf_dataset else dict(
            path_column=hp.path_column, label_column=hp.label_column, label_columns=hp.label_columns,
            split_column=hp.split_column)
        table = parse_manifest(rows, str(self.source), base, **columns, label_delimiter=hp.label_delimiter,
                               classes=hp.classes or dataset_classes, multilabel=hp.multilabel)
        self.bad_files.reject(table.problems)  # under `raise`, the first bad row stops here
        self.multilabel = table.multilabel
        good = self.screening.keep([entry.path for entry in table.entries])
        entries = [entry for entry in table.entries if entry.path in good]
        if not entries:
            first = table.entries[0].path
            why = self.bad_files.records.get(first, ("cannot be used",))[0]
            raise FinetuneError(f"data.manifest: none of the {len(table.entries)} images {self.source} lists can be used "
                                f"(e.g. {first}: {why}); relative paths start at {base} (data.root)")
        splits = self._split(entries, table.class_names, val_fraction, seed)
        self._check_training_labels(splits, table.class_names)
        return splits

    def _split(self, entries: list[Entry], class_names: list[str], val_fraction: float, seed: int) -> Splits:
        item = (lambda e: (e.path, e.labels)) if self.multilabel else (lambda e: (e.path, e.labels[0]))
        by_split = {name: [item(e) for e in entries if e.split == name] for name in SPLIT_NAMES}
        unassigned = [item(e) for e in entries if e.split is None]
        if by_split["val"]:
            by_split["train"] += unassigned
        elif self.multilabel:
            pool = by_split["train"] + unassigned
            train, val = iterative_split([labels for _, labels in pool], len(class_names), val_fraction, seed)
            by_split["train"], by_split["val"] = [pool[i] for i in train], [pool[i] for i in val]
        else:
            by_split["train"], by_split["val"] = stratified_split(by_split["train"] + unassigned, val_fraction, seed)
        return Splits(**by_split, class_names=class_names)

    def _check_training_labels(self, splits: Splits, class_names: list[str]) -> None:
        if not self.multilabel and len(class_names) < 2:
            raise FinetuneError(f"data.manifest: {self.source} has {len(class_names)} class(es) with images; "
                                "a classifier needs at least 2")
        missing = [name for name, n in zip(class_names, label_positives(splits.train, len(class_names))) if not n]
        if missing:
            raise FinetuneError(f"data.manifest: label(s) {missing} of {self.source} have no training image; add some, "
                                "or leave them out of data.classes")

    def data_report(self) -> DataReport:
        crop = (self.augmentation["crop"], self.crop_pct)
        return folder_report(str(self.source), type(self).__name__, self.splits, self.screening, crop)
