"""Turn a Hugging Face dataset into manifest rows (path, label, split) for the classification DataModules.

Our pipeline reads image FILES (header screening, crop-first JPEG decode), so images stored in the
dataset as bytes are written once as files under `<cache>/<fingerprint of the split>/<split>/<image
column>/`, and an `index.json` there lists every row's file: a later run reads that list and opens
no image bytes. Images the dataset gives as an existing local file (Image(decode=False) ->
{"path": ..., "bytes": None}) are used in place. `datasets` is imported only when a dataset is read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'finetune[hf]'"
OUR_SPLITS = ("train", "val", "test")
VAL_NAMES = ("validation", "valid", "val", "dev")  # the dataset's split read as val, the first present
SAVE_TO_DISK_FILES = ("dataset_dict.json", "state.json")  # DatasetDict / Dataset written by save_to_disk
PROBE_SECONDS = 3.0
_BATCH = 256  # rows read at a time while writing images: bounded memory for large splits
_MAGIC = (  # (prefix, extension); WebP is RIFF....WEBP
    (b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)


def hf_rows(
    name: str,
    config: str | None = None,
    splits: dict[str, str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
) -> tuple[list[dict], list[str] | None]:
    """(rows, class_names) of a Hugging Face dataset: a hub name, a save_to_disk folder, or Parquet file(s).

    Each row is {"path", "label" (str, or list of str for a list feature), "split" (train/val/test),
    "_line" (1-based running number)}. class_names: the ClassLabel names in their order when the
    label is a ClassLabel or a list of them, else None. `splits` maps our split names to the
    dataset's and replaces the default (train <- train, val <- validation/valid/val/dev, test <- test).
    """
    datasets = _import_datasets()
    loaded = _load(datasets, name, config)
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}  # a single Dataset is the training data
    chosen = _choose_splits(name, list(loaded), splits)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    rows: list[dict] = []
    class_names = None
    for ours, theirs in chosen.items():
        split = loaded[theirs]
        for key, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in split.column_names:
                raise FinetuneError(
                    f"data.{key}: {name} has no column {column!r}; its columns are {', '.join(split.column_names)}"
                )
        paths = _image_paths(datasets, name, split, theirs, image_column, cache)
        labels, names = _labels(name, split, label_column)
        class_names = class_names if class_names is not None else names
        rows += [
            {"path": path, "label": label, "split": ours, "_line": len(rows) + number}
            for number, (path, label) in enumerate(zip(paths, labels, strict=True), start=1)
        ]
    return rows, class_names


def default_cache_dir() -> Path:
    """`$FINETUNE_CACHE/hf-images`, or ~/.cache/finetune/hf-images."""
    from finetune.data.screening_cache import cache_root

    return cache_root() / "hf-images"


def _import_datasets():
    try:
        import datasets  # optional: only data.hf_dataset needs it
    except ImportError:
        raise FinetuneError(
            f"data.hf_dataset: reading Hugging Face datasets needs the datasets package; {INSTALL_HINT}"
        ) from None
    return datasets


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---- loading ------------------------------------------------------------------------------

def _looks_local(name: str) -> bool:
    """A path the user meant (it exists, or is written like a path); hub ids are `name` or `owner/name`."""
    return (
        Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
        or "\\" in name or name.endswith(".parquet")
    )


def _load(datasets, name: str, config: str | None):
    """A Dataset or DatasetDict (or a dict of Datasets)."""
    if not _looks_local(name):
        return _load_hub(datasets, name, config)
    path = Path(name).expanduser()
    if config is not None:
        raise FinetuneError(f"data.hf_config: {config!r} names a configuration of a hub dataset; {path} is local, "
                            "leave data.hf_config out")
    fix = "point data.hf_dataset at a save_to_disk folder, a Parquet file, or a folder of Parquet files"
    if not path.exists():
        raise FinetuneError(f"data.hf_dataset: {path} does not exist; {fix}")
    if path.is_dir() and any((path / marker).is_file() for marker in SAVE_TO_DISK_FILES):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as error:  # noqa: BLE001 - whatever datasets raises for a damaged folder
            raise FinetuneError(f"data.hf_dataset: {path} is not a readable save_to_disk folder "
                                f"({_first_line(error)}); save it again with save_to_disk") from None
    if path.is_file() and path.suffix.lower() == ".parquet":
        where = {"data_files": str(path)}
    elif path.is_dir() and next(path.rglob("*.parquet"), None) is not None:
        # datasets' own split inference: train-*.parquet, data/test-*.parquet, validation/..., else all train
        where = {"data_dir": str(path)}
    else:
        raise FinetuneError(f"data.hf_dataset: {path} is neither a save_to_disk folder (it has no "
                            f"{' or '.join(SAVE_TO_DISK_FILES)}) nor Parquet; {fix}")
    try:
        return datasets.load_dataset("parquet", **where)
    except Exception as error:  # noqa: BLE001 - whatever pyarrow/datasets raise for files that are not Parquet
        raise FinetuneError(f"data.hf_dataset: {path} holds no readable Parquet ({_first_line(error)}); {fix}") from None


def _offline_requested(datasets) -> bool:
    from huggingface_hub import constants

    # The env var is read when the libraries are imported; look at it again for one set since.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether huggingface_hub's configured endpoint (HF_ENDPOINT, proxies) answers within `timeout` seconds.

    Any HTTP answer counts. Run in a thread so that a name lookup that hangs cannot hold us longer."""
    from huggingface_hub import constants, get_session

    answered, finished = [], threading.Event()

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 - no answer, whatever the reason
            pass
        finally:
            finished.set()

    threading.Thread(target=probe, daemon=True).start()
    finished.wait(timeout)
    return bool(answered)


@contextmanager
def _offline_mode(datasets) -> Iterator[None]:
    """HF_HUB_OFFLINE for the calls inside: both libraries read it into constants at import, so set those."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def _load_hub(datasets, name: str, config: str | None):
    # Unreachable and not offline, `datasets` retries each request for ~20 s or more (longer where
    # connections time out instead of failing): offline mode fails at once, or loads the cached copy.
    offline = _offline_requested(datasets) or not hub_reachable()
    try:
        if offline:
            with _offline_mode(datasets):
                return datasets.load_dataset(name, config)
        return datasets.load_dataset(name, config)
    except (ConnectionError, FileNotFoundError) as error:
        local = "save_to_disk folder or Parquet files"
        if offline:
            raise FinetuneError(
                f"data.hf_dataset: {name!r} is neither a local folder nor reachable on the Hugging Face Hub "
                f"(offline: {_first_line(error)}); download it once online, or point data.hf_dataset at a {local}"
            ) from None
        raise FinetuneError(
            f"data.hf_dataset: {name!r} is neither a local folder nor a dataset on the Hugging Face Hub "
            f"({_first_line(error)}); check the name (owner/name; `hf auth login` for a gated or private one), "
            f"or point data.hf_dataset at a {local}"
        ) from None
    except ValueError as error:  # "Config name is missing ...", "BuilderConfig 'x' not found. Available: [...]"
        if "config" not in str(error).lower():
            raise
        raise FinetuneError(f"data.hf_config: {_first_line(error)}") from None


def _choose_splits(name: str, available: list[str], splits: dict[str, str] | None) -> dict[str, str]:
    """Our split -> the dataset's, in train/val/test order."""
    listed = ", ".join(available)
    if splits is None:
        if "train" not in available:
            raise FinetuneError(f"data.hf_splits: {name} has no split 'train'; its splits are {listed}; "
                                "map ours to its with data.hf_splits, e.g. {train: " + repr(available[0]) + "}")
        val = next((split for split in VAL_NAMES if split in available), None)
        splits = {"train": "train", "val": val, "test": "test" if "test" in available else None}
        return {ours: theirs for ours, theirs in splits.items() if theirs is not None}
    for ours, theirs in splits.items():
        if ours not in OUR_SPLITS:
            raise FinetuneError(f"data.hf_splits: {ours!r} is not one of {', '.join(OUR_SPLITS)}; "
                                "the keys are our splits, the values the dataset's")
        if theirs not in available:
            raise FinetuneError(f"data.hf_splits: {name} has no split {theirs!r}; its splits are {listed}")
    read_twice = [split for split in set(splits.values()) if list(splits.values()).count(split) > 1]
    if read_twice:
        raise FinetuneError(f"data.hf_splits: split {read_twice[0]!r} is mapped more than once; "
                            "map each of train, val, test to its own split")
    return {ours: splits[ours] for ours in OUR_SPLITS if ours in splits}


# ---- images -------------------------------------------------------------------------------

def _image_paths(datasets, name: str, split, split_name: str, column: str, cache: Path) -> list[str]:
    """Every row's image file: a path the dataset gives, or a file in the cache written from its bytes."""
    feature = split.features[column]
    kind = getattr(feature, "dtype", None)
    if isinstance(feature, datasets.Image):
        split_dir = cache / split._fingerprint / split_name / column
        return _cached_paths(name, split.cast_column(column, datasets.Image(decode=False)), column, split_dir)
    if kind in ("string", "large_string"):
        return [path or "" for path in _column_values(split, column)]  # file paths, as given
    if kind in ("binary", "large_binary"):
        return _cached_paths(name, split, column, cache / split._fingerprint / split_name / column)
    raise FinetuneError(f"data.image_column: column {column!r} of {name} is {feature}, not an Image, "
                        "image bytes, or file paths; name the image column with data.image_column")


def _column_values(split, column: str) -> list:
    # Through the arrow format so that a split's indices mapping (select, shuffle) is respected.
    return split.select_columns([column]).with_format("arrow")[:].column(0).to_pylist()


def _cached_paths(name: str, split, column: str, split_dir: Path) -> list[str]:
    index_file = split_dir / "index.json"
    reused = _read_index(index_file, split_dir, len(split))
    if reused is not None:
        return reused
    # Files an interrupted run wrote are kept (temporary ones start with "."); only the rest is written.
    present = {
        entry.name.split(".")[0]: entry.name for entry in os.scandir(split_dir) if not entry.name.startswith(".")
    } if split_dir.is_dir() else {}
    paths, written = [], 0
    for batch in split.select_columns([column]).with_format("arrow").iter(batch_size=_BATCH):
        for image in batch.column(0).to_pylist():
            number = f"{len(paths):08d}"
            data, given = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
            if data is None:  # the dataset points at a file: use it in place (none: the manifest reports the row)
                paths.append(given or "")
                continue
            if number not in present:
                split_dir.mkdir(parents=True, exist_ok=True)
                data, extension = _file_bytes(data)
                present[number] = f"{number}.{extension}"
                _write_atomically(split_dir / present[number], data)
                written += 1
            paths.append(str(split_dir / present[number]))
    if split_dir.is_dir():
        _write_atomically(index_file, json.dumps(paths).encode())
    if written:
        log.info("hf dataset %s: wrote %d images to %s (once; later runs reuse them)", name, written, split_dir)
    return paths


def _read_index(index_file: Path, split_dir: Path, rows: int) -> list[str] | None:
    """The paths a finished earlier run listed, if they are all still there (one directory listing)."""
    try:
        paths = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(paths, list) or len(paths) != rows:
        return None
    present = {str(split_dir / entry.name) for entry in os.scandir(split_dir)}
    ours = [path for path in paths if os.path.dirname(path) == str(split_dir)]
    return paths if all(path in present for path in ours) else None


def _file_bytes(data: bytes) -> tuple[bytes, str]:
    """(bytes, extension): the image as stored when our decoders read its format, else re-encoded as PNG."""
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return data, extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # GIF, ...: PNG keeps the pixels
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception:  # noqa: BLE001 - not an image: kept as it is, so the image checks report the row
        return data, "png"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write then rename, so that an interrupted run leaves no half-written file under the final name."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


# ---- labels -------------------------------------------------------------------------------

def _labels(name: str, split, column: str) -> tuple[list, list[str] | None]:
    """(labels as names: str, or list of str for a list feature; the ClassLabel names or None)."""
    feature = split.features[column]
    inner = getattr(feature, "feature", None)  # List / LargeList / Sequence(...)
    values = _column_values(split, column)
    if _is_class_label(feature):
        names = list(feature.names)
        return [_class_name(value, names) for value in values], names
    if type(feature).__name__ in ("List", "LargeList", "Sequence") and (_is_class_label(inner) or _is_value(inner)):
        names = list(inner.names) if _is_class_label(inner) else None
        convert = (lambda value: _class_name(value, names)) if names else _text
        return [[convert(item) for item in value or ()] for value in values], names
    if _is_value(feature):
        return [_text(value) for value in values], None
    raise FinetuneError(f"data.label_column: column {column!r} of {name} is {feature}; a label column holds "
                        "ClassLabel, text or integer values, or lists of them; name it with data.label_column")


def _is_class_label(feature) -> bool:
    return type(feature).__name__ == "ClassLabel"


def _is_value(feature) -> bool:
    return type(feature).__name__ == "Value"


def _class_name(value, names: list[str]) -> str:
    # -1 (or None) is how Hugging Face datasets mark an image without a label: empty, the manifest reports the row.
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else ""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
