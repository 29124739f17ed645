"""`finetune prepare --config CONFIG [--data.* ...] --output DIR`: a dataset as streaming shards.

The DataModule is built from `finetune fit`'s config as `finetune check-data` builds it (no
model, no Trainer; every file screened, `--screen full` by default, so no file training would
skip gets in; `data.on_bad_image` as set), then each split is written with LitData's `optimize`
in the layout of finetune.data.shard_format: the files' bytes as they are (no decode, no
re-encode), with their labels or masks, in the split's order.

Restart safety: everything is written to `DIR.partial` and renamed to DIR at the end, so DIR is
either complete or absent; a `.partial` folder left by a killed run is removed by the next.
A file that cannot be read when it is written (deleted since the screening) is left out and
listed in DIR/skipped_images.csv with the files the screening left out.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

import numpy as np

import finetune
from finetune.contract import import_class
from finetune.data.bad_images import SKIP_LIST, BadFiles, Problem, reason_of
from finetune.data.screening import screening
from finetune.data.shard_format import dataset_id, is_url, require_litdata, write_labels, write_meta
from finetune.data.splits import SPLIT_NAMES
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)
PARTIAL = ".partial"  # DIR.partial: the shards while they are written
_FAILED = ".failed"  # per worker process, the files it could not read (JSON lines)
_LITDATA_CACHE = ".litdata"  # LitData's scratch folders, which it empties at every start
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}


# ---- one sample ----------------------------------------------------------------------------


@dataclass
class SampleReader:
    """`optimize`'s fn: a position in the split -> the sample dict, or None (LitData then writes
    nothing) for a file that cannot be read, recorded in `failed_dir` for the main process.

    Its inputs are positions, not the items: LitData looks for file paths in the inputs and
    treats them as files to copy and balance by size, and refuses a list whose first item names
    no existing file (a file deleted since the screening)."""

    kind: str
    items: list
    num_classes: int
    failed_dir: str

    def __call__(self, position: int) -> dict | None:
        from litdata import Text  # a path as a str: LitData stores a bare str naming a file as that file

        item = self.items[position]
        try:
            if self.kind == "segmentation":
                image, mask = item
                return {"image": self._read(image, "image"), "mask": self._read(mask, "mask"), "path": Text(text=image)}
            path, label = item
            sample = {"image": self._read(path, "image"), "path": Text(text=path)}
            if self.kind == "multilabel":
                hot = np.zeros(self.num_classes, dtype=np.uint8)
                hot[list(label)] = 1
                sample["label"] = hot
            else:
                sample["label"] = int(label)
            return sample
        except _Unreadable as unreadable:
            line = json.dumps(unreadable.problem) + "\n"
            with open(os.path.join(self.failed_dir, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)
            return None

    @staticmethod
    def _read(path: str, kind: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            raise _Unreadable([path, f"unreadable when the shards were written: {reason_of(error, path)}", kind]) from None


class _Unreadable(Exception):
    def __init__(self, problem: list[str]):
        super().__init__(problem[0])
        self.problem = problem


# ---- the DataModule --------------------------------------------------------------------------


def shard_kind(dm) -> str:
    """classification, multilabel, segmentation or identity: what the DataModule's items are."""
    from finetune.data.segmentation import SegmentationFolderDataModule

    if isinstance(dm, SegmentationFolderDataModule):
        return "segmentation"
    if dm.splits.val_names is not None:
        return "identity"
    return "multilabel" if getattr(dm, "multilabel", False) else "classification"


def build_datamodule(cls, kwargs: dict, screen: str = "full"):
    """`cls(**kwargs)` with every file screened (`screen`: full, headers or auto, as
    finetune.data.screening); bad files are skipped or raised by `data.on_bad_image`."""
    from finetune.data.folder_module import FolderDataModule

    if not (isinstance(cls, type) and issubclass(cls, FolderDataModule)) or "shards" in kwargs:
        raise FinetuneError(f"data.class_path: finetune prepare reads image folders and manifests (ImageFolderDataModule, "
                            f"ManifestDataModule, SegmentationFolderDataModule, IdentityFolderDataModule), not "
                            f"{getattr(cls, '__name__', cls)}")
    with screening(screen):
        return cls(**kwargs)


def _base_folder(dm) -> str | None:
    """Where the dataset's relative paths start: data.root, else a manifest's folder; None: the
    paths' common folder (a Hugging Face dataset's image cache)."""
    hp = dm.hparams
    if hp.get("root"):
        return os.path.abspath(os.path.expanduser(hp.root))
    if hp.get("manifest"):
        return os.path.dirname(os.path.abspath(os.path.expanduser(hp.manifest)))
    return None


def _relative_paths(paths: dict[str, list[str]], base: str | None) -> dict[str, list[str]]:
    absolute = {split: [os.path.abspath(p) for p in split_paths] for split, split_paths in paths.items()}
    every = [p for split_paths in absolute.values() for p in split_paths]
    if base is None:
        base = os.path.commonpath(every) if every else ""
        base = os.path.dirname(base) if len(every) == 1 else base
    return {split: [Path(os.path.relpath(p, base)).as_posix() for p in split_paths]
            for split, split_paths in absolute.items()}


# ---- writing ---------------------------------------------------------------------------------


def parse_size(value: int | str) -> int:
    """`64MB`, `512k`, `1000000` -> bytes (powers of 1000, as LitData counts them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) * unit < 1:
        raise FinetuneError(f"--chunk_bytes: {value!r} is not a size; pass e.g. 64MB, 256MB or 1GB")
    return int(float(match.group(1)) * unit)


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, absolute; refused (one line) when it exists and `overwrite` is off."""
    if is_url(out):
        raise FinetuneError(f"--output: {out} is a URL; write the shards to a local folder, then copy it to the bucket "
                            "(e.g. `aws s3 sync DIR s3://...`): training reads the URL")
    path = Path(out).expanduser().resolve()
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FinetuneError(f"--output: {path} already exists; pass --overwrite to replace it, or another --output")
    return path


def check_workers(num_workers: int | None) -> int:
    """The worker processes to write with: every CPU by default."""
    if num_workers is not None and num_workers < 1:
        raise FinetuneError(f"--num_workers: {num_workers} must be at least 1 (default: every CPU)")
    return num_workers or os.cpu_count() or 1


@contextmanager
def _litdata_scope(scratch: Path) -> Iterator[None]:
    """LitData's optimize, contained: its scratch folders (by default one shared /tmp/chunks that
    every run empties at start) in `scratch`; the process-wide start method it forces and the
    SIGINT handler and environment it sets are put back afterwards. Its INFO lines (one per
    worker per split) are held back."""
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER", "DATA_OPTIMIZER_NUM_WORKERS")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_method = multiprocessing.get_start_method(allow_none=True)
    saved_sigint = signal.getsignal(signal.SIGINT)
    litdata_log = logging.getLogger("litdata")
    saved_level = litdata_log.level
    litdata_log.setLevel(logging.WARNING)
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(scratch / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(scratch / "data")
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        multiprocessing.set_start_method(saved_method, force=True)
        signal.signal(signal.SIGINT, saved_sigint)
        litdata_log.setLevel(saved_level)


def _start_method() -> str | None:
    # Workers only read files: forking (Linux) starts them at once, where spawning imports torch
    # again in each (seconds per split). Elsewhere LitData's default, spawn.
    return "fork" if sys.platform.startswith("linux") else None


def _written(folder: Path) -> tuple[int, int]:
    """(samples, bytes) in a LitData folder, from its index."""
    index = folder / "index.json"
    if not index.is_file():
        return 0, 0
    chunks = json.loads(index.read_text(encoding="utf-8")).get("chunks", [])
    return sum(c["chunk_size"] for c in chunks), sum(c["chunk_bytes"] for c in chunks)


def write_split(kind: str, items: list, num_classes: int, folder: Path, scratch: Path, num_workers: int,
                chunk_bytes: int) -> tuple[int, int, list[Problem]]:
    """One split's items as a LitData folder, in their order; (samples, bytes, files that could not be read)."""
    from litdata import optimize

    failed_dir = scratch / _FAILED / folder.name
    failed_dir.mkdir(parents=True, exist_ok=True)
    reader = SampleReader(kind, items, num_classes, str(failed_dir))
    with _litdata_scope(scratch / _LITDATA_CACHE):
        # keep_data_ordered: each worker writes a contiguous slice, and the index lists the
        # slices in worker order, so the shards keep the split's order (LitData's default
        # hands items to whichever worker is free). reorder_files off: no sorting by file size.
        optimize(fn=reader, inputs=list(range(len(items))), output_dir=str(folder), num_workers=min(num_workers, len(items)),
                 chunk_bytes=chunk_bytes, keep_data_ordered=True, reorder_files=False, start_method=_start_method(),
                 verbose=False)
    problems = [Problem(*json.loads(line)) for file in sorted(failed_dir.iterdir())
                for line in file.read_text(encoding="utf-8").splitlines()]
    samples, size = _written(folder)
    if samples != len(items) - len(problems):
        raise RuntimeError(f"{folder}: LitData wrote {samples} samples of {len(items)} items, {len(problems)} unreadable")
    if not samples:
        shutil.rmtree(folder, ignore_errors=True)
    return samples, size, problems


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _files(kind: str, item: tuple) -> tuple[str, ...]:
    return item if kind == "segmentation" else item[:1]  # (image, mask), or (path,) of (path, label)


def _labels(kind: str, items: list) -> list:
    return [list(label) if kind == "multilabel" else int(label) for _, label in items]


def _finish(partial: Path, out: Path) -> None:
    """Put the complete shards in place of `out` (an older version of it removed)."""
    shutil.rmtree(partial / _LITDATA_CACHE, ignore_errors=True)
    shutil.rmtree(partial / _FAILED, ignore_errors=True)
    if out.exists() or out.is_symlink():
        old = out.with_name(out.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        partial.rename(out)


def write_shards(dm, out: str | os.PathLike, num_workers: int | None = None, chunk_bytes: int | str = "64MB",
                 overwrite: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Write the splits of a built DataModule (FolderDataModule) to `out` as shards; the metadata.

    `num_workers`: LitData worker processes (default: every CPU); `chunk_bytes`: chunk size
    (`64MB`); `echo`: where the one summary line per split and the skipped count go."""
    out = check_output(out, overwrite)
    chunk_bytes = parse_size(chunk_bytes)
    num_workers = check_workers(num_workers)
    partial = out.with_name(out.name + PARTIAL)
    if partial.exists():
        log.warning("removing %s, left by an interrupted `finetune prepare`", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    kind = shard_kind(dm)
    class_names = list(dm.class_names)
    written: dict[str, list] = {}
    for split, items in dm.splits.items():
        if not items:
            written[split] = []
            continue
        start = time.perf_counter()
        samples, size, problems = write_split(kind, items, len(class_names), partial / split, partial, num_workers,
                                              chunk_bytes)
        dm.bad_files.reject(problems, found="prepare")  # under on_bad_image: raise, one line
        lost = {p.path for p in problems}
        written[split] = [item for item in items if not lost.intersection(_files(kind, item))]
        echo(f"{split}: {samples} samples, {_human(size)} in {time.perf_counter() - start:.1f} s -> {out / split}")
    skipped = BadFiles("skip")
    skipped.records = dict(dm.bad_files.records)
    skipped.path = partial / SKIP_LIST
    skipped.write()
    if kind != "segmentation":
        write_labels(partial, {split: _labels(kind, items) for split, items in written.items()})
    paths = {split: [item[0] for item in items] for split, items in written.items()}
    val_names = dm.splits.val_names
    meta = {
        "kind": kind,
        "class_names": class_names,
        "val_names": None if val_names is None else list(val_names),
        "splits": {split: len(written[split]) for split in SPLIT_NAMES},
        "source": str(getattr(dm, "source", None) or dm.hparams.get("root")),
        "datamodule": type(dm).__name__,
        "dataset_id": dataset_id(kind, class_names, val_names, _relative_paths(paths, _base_folder(dm))),
        "skipped": len(skipped.records),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finetune": finetune.__version__,
    }
    write_meta(partial, meta)
    _finish(partial, out)
    echo(f"skipped: {len(skipped.records)} files" + (f", listed in {out / SKIP_LIST}" if skipped.records else ""))
    return meta


# ---- the command -----------------------------------------------------------------------------


def _add_arguments(parser) -> None:
    from jsonargparse import ActionYesNo

    parser.add_argument("--output", type=Optional[str], default=None, help="prepare: the folder to write the shards to")
    parser.add_argument("--overwrite", action=ActionYesNo, nargs="?", default=False, help="prepare: replace --output if it exists")
    parser.add_argument("--num_workers", type=Optional[int], default=None,
                        help="prepare: processes writing the shards (default: every CPU)")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="prepare: the size of a shard chunk (e.g. 64MB)")
    parser.add_argument("--screen", type=Literal["full", "headers", "auto"], default="full",
                        help="prepare: decode every file before writing (full), read headers only, or by the data's size")


def main(args: list[str] | None = None) -> int:
    """`args` as after `finetune prepare`; None: sys.argv[1:]."""
    from finetune.cli import create_cli  # Lightning: imported only when the command runs

    cli = create_cli(args, run=False, instantiate=False, extra_arguments=_add_arguments)
    config = cli.config
    if not config.output:
        raise FinetuneError("--output: not set; pass --output DIR, the folder to write the shards to")
    require_litdata("finetune prepare")
    # The flags first: the screening can take a while.
    check_output(config.output, config.overwrite)
    parse_size(config.chunk_bytes)
    check_workers(config.num_workers)
    dm = build_datamodule(import_class(config.data.class_path), dict(config.data.init_args.as_dict()), config.screen)
    write_shards(dm, config.output, config.num_workers, config.chunk_bytes, config.overwrite)
    return 0
