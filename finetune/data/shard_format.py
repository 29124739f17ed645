"""The layout of the shards `finetune prepare` writes, shared by the writer and the training side.

    OUT/finetune_shards.json   META_FILE: what the shards hold (write_meta / read_meta)
    OUT/labels.json            LABELS_FILE: {split: [label of each sample, in shard order]}
                               (classification, identity: int; multilabel: list of label indices;
                               segmentation: no file, its labels are the masks)
    OUT/skipped_images.csv     the files left out, as a training run lists them
    OUT/<split>/               a LitData optimized folder (index.json + chunks) per non-empty split

Each sample is a dict: "image" (the file's bytes, unchanged), "path" (str, as the DataModule
listed it) and "label" (int; multilabel: a uint8 multi-hot array) or "mask" (the mask file's
bytes). The metadata is JSON:

    {"format": FORMAT, "version": VERSION, "kind": one of KINDS, "class_names": [...],
     "val_names": [...] or null (identities: the validation split's own names),
     "splits": {"train": n, "val": n, "test": n}, "source": data root or manifest,
     "datamodule": class name, "dataset_id": dataset_id(...), "skipped": count,
     "created": ISO time, "finetune": version}

A URL (`s3://`, `gs://`, `r2://`) is read through LitData's own storage clients (the ones
StreamingDataset downloads chunks with), so it needs no other package and takes the same
credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from finetune.data.splits import SPLIT_NAMES
from finetune.errors import FinetuneError

FORMAT = "finetune-shards"
VERSION = 1
META_FILE = "finetune_shards.json"
LABELS_FILE = "labels.json"
KINDS = ("classification", "multilabel", "segmentation", "identity")
MAKE = "make shards with `finetune prepare`"


def is_url(location: str | os.PathLike) -> bool:
    """`s3://bucket/x` and the like; a local path (Windows drive letters included) is not."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def shard_url(location: str | os.PathLike, split: str) -> str:
    """The LitData folder (or URL) of one split."""
    location = str(location)
    return f"{location.rstrip('/')}/{split}" if is_url(location) else os.path.join(location, split)


def dataset_id(kind: str, class_names: Sequence[str], val_names: Sequence[str] | None,
               split_paths: Mapping[str, Sequence[str]]) -> str:
    """sha256 hex of the canonical JSON of what the shards are: their kind, the names labels index
    and each split's sorted relative paths (POSIX separators). Every split in SPLIT_NAMES is
    present (empty when absent), so leaving out an empty split does not change the id."""
    payload = {
        "kind": kind,
        "class_names": list(class_names),
        "val_names": None if val_names is None else list(val_names),
        "splits": {split: sorted(split_paths.get(split, ())) for split in SPLIT_NAMES},
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_meta(out: str | os.PathLike, meta: Mapping) -> Path:
    """OUT/finetune_shards.json with `meta`, FORMAT and VERSION first; the file's path."""
    path = Path(out) / META_FILE
    rest = {key: value for key, value in meta.items() if key not in ("format", "version")}
    _write_json(path, {"format": FORMAT, "version": VERSION, **rest})
    return path


def write_labels(out: str | os.PathLike, labels: Mapping[str, list]) -> Path:
    """OUT/labels.json: each split's labels in shard order; the file's path."""
    path = Path(out) / LABELS_FILE
    _write_json(path, {split: list(labels.get(split, [])) for split in SPLIT_NAMES})
    return path


def _fetch(url: str, name: str, storage_options: dict | None) -> str:
    from litdata.streaming.fs_provider import _get_fs_provider  # LitData's S3 / GCS / R2 clients

    remote = f"{url.rstrip('/')}/{name}"
    try:
        provider = _get_fs_provider(remote, storage_options or {})
    except ValueError:
        raise FinetuneError(f"{url}: LitData reads s3://, gs:// and r2:// URLs; copy the shards to a local folder "
                            f"or such a bucket") from None
    with tempfile.TemporaryDirectory(prefix="finetune-shards-") as folder:
        local = os.path.join(folder, name)
        try:
            provider.download_file(remote, local)
            return Path(local).read_text(encoding="utf-8")
        except Exception as error:  # noqa: BLE001 - each store's client has its own errors
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise FinetuneError(f"{remote} could not be read ({reason}); check the URL and the credentials, "
                                f"or {MAKE}") from None


def read_small_file(location: str | os.PathLike, name: str, storage_options: dict | None = None) -> str:
    """The text of `name` (the metadata, the labels) in a shards folder or URL."""
    if is_url(location):
        return _fetch(str(location), name, storage_options)
    path = Path(location).expanduser() / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FinetuneError(f"{Path(location).expanduser()} has no {name}; {MAKE}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FinetuneError(f"{path} is not readable ({error}); {MAKE} again") from None


def read_meta(location: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The metadata of a shards folder or URL, checked: one-line FinetuneError for a missing or
    unreadable file, or one of another format or version."""
    text = read_small_file(location, META_FILE, storage_options)
    where = shard_url(location, META_FILE)
    try:
        meta = json.loads(text)
    except ValueError as error:
        raise FinetuneError(f"{where} is not readable JSON ({error}); {MAKE} again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FinetuneError(f"{where} is not finetune shards metadata (format {found!r}, expected {FORMAT!r}); {MAKE}")
    if meta.get("version") != VERSION:
        raise FinetuneError(f"{where} is version {meta.get('version')!r} of the shard format; this finetune reads "
                            f"version {VERSION}: {MAKE} again")
    if meta.get("kind") not in KINDS:
        raise FinetuneError(f"{where} has kind {meta.get('kind')!r}, not one of {', '.join(KINDS)}; {MAKE} again")
    return meta


def check_local_split(location: str | os.PathLike, split: str) -> None:
    """A local split's index.json and chunk files, checked against each other by size (a stat per
    chunk): a missing index or chunk, or a truncated chunk, is one FinetuneError naming the file.
    A URL's chunks are checked by LitData as it downloads them."""
    if is_url(location):
        return
    folder = Path(location).expanduser() / split
    index = folder / "index.json"
    if not index.is_file():
        raise FinetuneError(f"data.shards: {index} is missing; the {split} split is incomplete: {MAKE} again")
    try:
        chunks = json.loads(index.read_text())["chunks"]
    except (ValueError, KeyError) as error:
        raise FinetuneError(f"data.shards: {index} is not a LitData index ({error}); {MAKE} again") from None
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            raise FinetuneError(f"data.shards: {path} is missing; {MAKE} again")
        if size != chunk["chunk_bytes"]:
            raise FinetuneError(f"data.shards: {path} is truncated or changed ({size} bytes, its index says "
                                f"{chunk['chunk_bytes']}); {MAKE} again")


INSTALL_HINT = "pip install 'finetune[shards]'"


def require_litdata(key: str) -> None:
    """One line naming `key` when LitData (an optional extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("litdata") is None:
        raise FinetuneError(f"{key}: streaming shards need the litdata package; {INSTALL_HINT}")
