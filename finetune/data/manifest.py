"""Read a manifest: a table (CSV, TSV, JSONL or Parquet) of image paths and their labels.

`read_table` turns a file into rows; `parse_manifest` turns rows into entries (path, class
indices, split), `parse_pairs` into segmentation (image, mask, split) pairs; both leave out the
rows they cannot use as `problems`, for the caller to hand to `BadFiles.reject`
(`data.on_bad_image: raise` stops at the first, `skip` lists them). Neither opens the images:
the DataModule screens the files afterwards, as for a folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.bad_images import Problem
from finetune.errors import FinetuneError

LINE = "_line"  # the key of a row's 1-based line (CSV/TSV/JSONL) or row (Parquet) number in the file
SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None, ".parquet": None}

# Header names looked for when a column is not named (case-insensitive; the first present wins).
PATH_NAMES = ("path", "image", "image_path", "filepath", "file_path", "file", "filename", "img", "image_id")
LABEL_NAMES = ("label", "labels", "tags", "class", "classes", "category", "target")
SPLIT_NAMES = ("split", "subset", "set", "partition")
# Segmentation pairs: an image column and a mask column (a class-index PNG per image).
IMAGE_NAMES = ("image", "image_path", "path", "img", "file", "filename")
MASK_NAMES = ("mask", "mask_path", "label", "annotation", "segmentation", "target")

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
ONE_HOT = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "1.0": 1, "0.0": 0, "": 0}


@dataclass
class Entry:
    path: str  # absolute, or relative to the working directory when `base` was
    labels: tuple[int, ...]  # sorted class indices; empty for a one-hot row of zeros (an image with none of the labels)
    split: str | None  # "train" | "val" | "test"; None: the DataModule splits it
    line: int  # the row's line in the manifest, for messages


@dataclass
class Manifest:
    entries: list[Entry]
    class_names: list[str]
    multilabel: bool
    source: str
    columns: dict[str, str | list[str] | None]  # path, label, labels (one-hot), split: the columns used
    problems: list[Problem] = field(default_factory=list)  # the rows left out, kind "row", path "<source>:<line>"


@dataclass
class PairManifest:
    pairs: list[tuple[str, str, str | None]]  # (image path, mask path, split or None), resolved like Entry.path
    source: str
    columns: dict[str, str | None]  # image, mask, split: the columns used
    problems: list[Problem] = field(default_factory=list)  # the rows left out, kind "row", path "<source>:<line>"


# ---- reading a file ---------------------------------------------------------------------

def read_table(path: str | Path) -> list[dict]:
    """The rows of a manifest, as dicts keyed by the header, each with its 1-based line in `row["_line"]`
    (CSV/TSV: the file line the row ends on, the header being line 1; JSONL: the file line;
    Parquet: the row number). JSON and Parquet values keep their types (a list stays a list)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise FinetuneError(
            f"data.manifest: {path} has suffix {path.suffix or '(none)'!r}; a manifest is "
            f"{', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise FinetuneError(f"data.manifest: {path} does not exist; pass the path of the manifest file")
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    return _read_delimited(path, SUFFIXES[suffix])


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames or not any(name.strip() for name in reader.fieldnames):
            raise FinetuneError(f"data.manifest: {path} is empty; its first line must name the columns")
        # A row with more values than the header keeps the extra ones under the key None (parse_manifest
        # reports it); a row with fewer has None for the missing ones.
        return [{**row, LINE: reader.line_num} for row in reader]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise FinetuneError(f"data.manifest: {path}:{number} is not JSON ({error.msg}); "
                                    "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"data.manifest: {path}:{number} is a JSON {type(row).__name__}, not an object; "
                                    'each line must be one object such as {"path": "a.jpg", "label": "cat"}')
            rows.append({**row, LINE: number})
    if not rows:
        raise FinetuneError(f"data.manifest: {path} is empty; write one JSON object per line")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet manifests need it
    except ImportError:
        raise FinetuneError(
            "data.manifest: reading Parquet needs pyarrow; pip install 'finetune[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - whatever pyarrow raises for a file that is not Parquet
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FinetuneError(f"data.manifest: {path} is not a readable Parquet file ({first})") from None
    if not table.column_names:
        raise FinetuneError(f"data.manifest: {path} is empty; it has no columns")
    return [{**row, LINE: number} for number, row in enumerate(table.to_pylist(), start=1)]


# ---- rows to entries --------------------------------------------------------------------

def _header(rows: list[dict]) -> list[str]:
    """The column names, in order of first appearance (JSONL rows need not all have the same keys)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update((key, None) for key in row if isinstance(key, str) and key != LINE)
    return list(names)


def _find_column(header: list[str], wanted: str) -> str | None:
    if wanted in header:
        return wanted
    folded = [name for name in header if name.strip().lower() == wanted.strip().lower()]
    return folded[0] if folded else None


def _column(header: list[str], source: str, key: str, given: str | None, candidates: Iterable[str],
            required: bool) -> str | None:
    """The column named `given`, or the first of `candidates` the header has (case-insensitive)."""
    listed = ", ".join(header)
    if given is not None:
        found = _find_column(header, given)
        if found is None:
            raise FinetuneError(f"data.{key}: manifest {source} has no column {given!r}; its columns are {listed}")
        return found
    for candidate in candidates:
        found = _find_column(header, candidate)
        if found is not None:
            return found
    if required:
        raise FinetuneError(
            f"data.{key}: manifest {source} has none of the columns {', '.join(candidates)}; its columns are {listed}; "
            f"name the column with data.{key}"
        )
    return None


def _text(value) -> str:
    """A cell as text: None/NaN empty, an int-valued float without its '.0' (3.0 -> '3')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _delimiter(values: list) -> str | None:
    texts = [value for value in values if isinstance(value, str)]
    for candidate in (";", "|"):
        if any(candidate in text for text in texts):
            return candidate
    return None


def _label_names(value, delimiter: str | None) -> list[str]:
    """The labels of a cell: a list as it is, text split at `delimiter`; pieces stripped, empty ones dropped."""
    if isinstance(value, (list, tuple)):
        pieces = [_text(item) for item in value]
    else:
        text = _text(value)
        pieces = text.split(delimiter) if delimiter is not None else [text]
    return list(dict.fromkeys(piece.strip() for piece in pieces if piece.strip()))


def _one_hot(value) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return ONE_HOT.get(_text(value).lower())


def _split(value) -> tuple[str | None, str | None]:
    """(split, None) or (None, why the value is not one)."""
    text = _text(value).lower()
    if not text:
        return None, None
    if text in SPLIT_ALIASES:
        return SPLIT_ALIASES[text], None
    return None, (f"split {_text(value)!r} is not one of {', '.join(SPLIT_ALIASES)} "
                  "(or empty, to let data.val_fraction split the row)")


def _resolve(value, base: Path) -> str:
    path = Path(_text(value)).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _check_not_empty(rows: list[dict], source: str) -> None:
    if not rows:
        raise FinetuneError(f"data.manifest: {source} has no rows; add one row per image")


def _extra_values(row: dict) -> str | None:
    """Why a CSV/TSV row has more values than the header has columns, or None."""
    extra = row.get(None)
    if extra and any(str(value).strip() for value in extra):  # a trailing delimiter alone is harmless
        columns = len([key for key in row if isinstance(key, str) and key != LINE])
        return (f"{columns + len(extra)} values but the header has {columns} columns; "
                "quote values that contain the delimiter")
    return None


def _empty_path(row: dict, key: str, what: str = "image") -> str | None:
    return None if _text(row.get(key)) else f"empty path in column {key!r}; give the {what}'s path"


def _repeated(first_line: dict[str, int], path: str, line: int) -> str | None:
    """Why the row names an image an earlier row named, or None (and the row's line is noted)."""
    if path in first_line:
        return f"same image as line {first_line[path]}; remove one of the rows"
    first_line[path] = line
    return None


def _no_usable_row(source: str, problems: list[Problem]) -> FinetuneError:
    return FinetuneError(
        f"data.manifest: {source} has no usable row ({len(problems)} bad: {problems[0].path}: {problems[0].reason})"
    )


@dataclass
class _Row:
    """A row read so far: its labels by name (one-hot: by index) before the class list is known."""
    line: int
    path: str
    names: list[str]
    split: str | None


def parse_manifest(
    rows: list[dict],
    source: str,
    base: Path,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    label_columns: list[str] | None = None,
    label_delimiter: str | None = None,
    split_column: str | None = None,
    classes: list[str] | None = None,
    multilabel: bool | None = None,
) -> Manifest:
    """Entries of the rows (from `read_table`); rows it cannot use are `problems`, not errors.

    Raises FinetuneError (one line) for a column that is missing, or when no row is usable."""
    _check_not_empty(rows, source)
    header = _header(rows)
    path_key = _column(header, source, "path_column", path_column, PATH_NAMES, required=True)
    if label_columns is not None:
        if not label_columns:
            raise FinetuneError("data.label_columns: is empty; list the one-hot columns, one per class")
        one_hot = [_column(header, source, "label_columns", name, (), required=True) for name in label_columns]
        label_key = None
        if classes is not None and list(classes) != list(label_columns):
            raise FinetuneError("data.classes: with data.label_columns the columns name the classes; "
                                "leave data.classes out")
    else:
        one_hot = None
        label_key = _column(header, source, "label_column", label_column, LABEL_NAMES, required=True)
    split_key = _column(header, source, "split_column", split_column, SPLIT_NAMES, required=False)
    if classes is not None:
        repeated = sorted({name for name in classes if list(classes).count(name) > 1})
        if repeated:
            raise FinetuneError(f"data.classes: {repeated[0]!r} is listed more than once; list each class once")

    delimiter = label_delimiter
    if one_hot is None and delimiter is None:
        delimiter = _delimiter([row.get(label_key) for row in rows])
    if multilabel is None:
        multilabel = one_hot is not None or delimiter is not None or any(
            isinstance(row.get(label_key), (list, tuple)) and len(row[label_key]) > 1 for row in rows
        )

    problems: list[Problem] = []
    read: list[_Row] = []
    for row in rows:
        line = row.get(LINE, 0)
        got = _read_row(row, path_key, label_key, one_hot, delimiter, split_key, base, multilabel)
        if isinstance(got, str):
            problems.append(Problem(f"{source}:{line}", got, kind="row"))
        else:
            read.append(got)

    if one_hot is not None:
        class_names = list(label_columns)
    elif classes is not None:
        class_names = list(classes)
    else:
        class_names = sorted({name for row in read for name in row.names})
    index = {name: i for i, name in enumerate(class_names)}

    entries: list[Entry] = []
    first_line: dict[str, int] = {}
    for row in read:
        unknown = [name for name in row.names if name not in index]
        if unknown:
            problems.append(Problem(f"{source}:{row.line}", f"label {unknown[0]!r} is not in data.classes; "
                                    "add it to data.classes", kind="row"))
            continue
        repeated = _repeated(first_line, row.path, row.line)
        if repeated:
            problems.append(Problem(f"{source}:{row.line}", repeated, kind="row"))
            continue
        entries.append(Entry(row.path, tuple(sorted(index[name] for name in row.names)), row.split, row.line))

    problems.sort(key=lambda problem: int(problem.path.rsplit(":", 1)[1]))
    if not entries:
        raise _no_usable_row(source, problems)
    columns = {"path": path_key, "label": label_key, "labels": one_hot, "split": split_key}
    return Manifest(entries, class_names, multilabel, source, columns, problems)


def _read_row(row: dict, path_key: str, label_key: str | None, one_hot: list[str] | None, delimiter: str | None,
              split_key: str | None, base: Path, multilabel: bool) -> _Row | str:
    """The row, or why it cannot be used (a reason that says the fix)."""
    why = _extra_values(row) or _empty_path(row, path_key)
    if why:
        return why
    split, why = _split(row.get(split_key)) if split_key is not None else (None, None)
    if why:
        return why
    if one_hot is not None:
        names = []
        for column in one_hot:
            value = _one_hot(row.get(column))
            if value is None:
                return (f"column {column!r} has {_text(row.get(column))!r}; one-hot columns take "
                        "1/0, true/false or yes/no (empty is 0)")
            if value:
                names.append(column)
        if not multilabel and len(names) != 1:
            return (f"{len(names)} labels in the one-hot columns but data.multilabel is false; "
                    "set exactly one column to 1, or set data.multilabel true")
    else:
        names = _label_names(row.get(label_key), delimiter)
        if not names:
            return f"no label in column {label_key!r}; give the image its label(s)"
        if not multilabel and len(names) > 1:
            return (f"{len(names)} labels but data.multilabel is false ({', '.join(map(repr, names))}); "
                    "give one label, or set data.multilabel true")
    return _Row(row.get(LINE, 0), _resolve(row.get(path_key), base), names, split)


def parse_pairs(
    rows: list[dict],
    source: str,
    base: Path,
    *,
    image_column: str | None = None,
    mask_column: str | None = None,
    split_column: str | None = None,
) -> PairManifest:
    """Segmentation (image, mask, split) pairs of the rows (from `read_table`); rows it cannot use
    (an empty path, an unknown split, an image an earlier row has) are `problems`, not errors.

    Raises FinetuneError (one line) for a column that is missing, or when no row is usable."""
    _check_not_empty(rows, source)
    header = _header(rows)
    image_key = _column(header, source, "image_column", image_column, IMAGE_NAMES, required=True)
    mask_key = _column(header, source, "mask_column", mask_column, MASK_NAMES, required=True)
    if mask_key == image_key:
        raise FinetuneError(f"data.mask_column: manifest {source} would read images and masks from the same column "
                            f"{image_key!r}; name the mask column with data.mask_column")
    split_key = _column(header, source, "split_column", split_column, SPLIT_NAMES, required=False)

    pairs: list[tuple[str, str, str | None]] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for row in rows:
        line = row.get(LINE, 0)
        got = _read_pair(row, image_key, mask_key, split_key, base)
        why = got if isinstance(got, str) else _repeated(first_line, got[0], line)
        if why:
            problems.append(Problem(f"{source}:{line}", why, kind="row"))
        else:
            pairs.append(got)
    if not pairs:
        raise _no_usable_row(source, problems)
    return PairManifest(pairs, source, {"image": image_key, "mask": mask_key, "split": split_key}, problems)


def _read_pair(row: dict, image_key: str, mask_key: str, split_key: str | None,
               base: Path) -> tuple[str, str, str | None] | str:
    """The row's (image, mask, split), or why it cannot be used (a reason that says the fix)."""
    why = _extra_values(row) or _empty_path(row, image_key) or _empty_path(row, mask_key, "mask")
    if why:
        return why
    split, why = _split(row.get(split_key)) if split_key is not None else (None, None)
    return why or (_resolve(row.get(image_key), base), _resolve(row.get(mask_key), base), split)


def count_labels(entries: list[Entry], num_classes: int) -> list[int]:
    """How many entries have each class (positives per class)."""
    counts = [0] * num_classes
    for entry in entries:
        for label in entry.labels:
            counts[label] += 1
    return counts
