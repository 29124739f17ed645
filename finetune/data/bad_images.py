"""What happens to a file that cannot be used: `data.on_bad_image: skip | raise`.

A bad file is found in one of two places:

- When the DataModule is built (finetune.data.screening): every file's header, and every pixel
  of a small set. What fails there is left out of the splits, so no worker ever opens it.
- While loading, in a DataLoader worker: a large set's file that is corrupt past its header.
  The Dataset then returns the next sample that loads in its place and names the file in the
  item's "skipped" field. A worker is another process and the batch is the one thing that
  comes back from it, so the batch carries the record; the DataModule's
  `on_before_batch_transfer`, in the main process, takes the field out, records the file and,
  under `raise`, stops with one line (a worker's exception would arrive as its traceback).
  A replacement rather than a smaller batch: every batch keeps its size (BatchNorm, DDP ranks
  in step), none is empty, and the replacement's augmentation is still seeded by the original
  (seed, epoch, index), so a resumed run repeats it.

Skipped files (path, reason, kind, when found) go to `<default_root_dir>/skipped_images.csv`
at the first batch a Trainer loads, and again whenever the list grows.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

POLICIES = ("skip", "raise")
SKIP_LIST = "skipped_images.csv"
# Consecutive unreadable files a Dataset tries before giving up: more in a row is no longer a
# bad file but a bad setting (e.g. a class list that makes every mask invalid).
MAX_REPLACEMENTS = 32
FIX = "fix or remove it, or pass --data.on_bad_image skip to train without it"


class BadImageError(FinetuneError, ValueError):
    """A file the data cannot use; the message is one line that names it and the fix (the CLI
    prints it without a traceback)."""


class Problem(NamedTuple):
    path: str
    reason: str
    kind: str = "image"  # image | mask | folder


class BadFile(Exception):
    """A read that failed, with the file it failed on (a mask or an image)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def reason_of(error: BaseException, path: str | Path = "") -> str:
    """The first line of an exception's message, without a leading 'path: '."""
    text = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    prefix = f"{path}: "
    return text[len(prefix):] if path and text.startswith(prefix) else text


def read_guarded(read: Callable, path: str, *args):
    """`read(path, *args)`, where PIL's decompression-bomb warning is an error and any failure a
    BadFile naming `path`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return read(path, *args)
    except Exception as error:  # noqa: BLE001 - whatever a broken file makes a decoder raise
        raise BadFile(str(path), reason_of(error, path)) from None


def load_or_replace(load: Callable[[int], dict], index: int, size: int) -> dict:
    """`load(index)`, or the next index that loads; item["skipped"] lists the files that did not
    (JSON [[path, reason], ...], "" when none: default_collate needs the key in every item)."""
    skipped = []
    for step in range(min(size, MAX_REPLACEMENTS + 1)):
        try:
            item = load((index + step) % size)
        except BadFile as bad:
            skipped.append((bad.path, bad.reason))
            continue
        item["skipped"] = json.dumps(skipped) if skipped else ""
        return item
    path, reason = skipped[0]
    raise BadImageError(f"{path}: {reason}; and the {len(skipped) - 1} files after it failed too: run `finetune check-data`")


def one_line(problem: Problem, more: int = 0) -> str:
    others = f" ({more} more unusable files: `finetune check-data` lists them)" if more else ""
    return f"{problem.path}: {problem.reason}{others}; {FIX}"


class BadFiles:
    """The files a DataModule left out, kept in the main process, and what to do about the next."""

    def __init__(self, policy: str = "skip"):
        if policy not in POLICIES:
            raise ValueError(f"data.on_bad_image: {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.records: dict[str, tuple[str, str, str]] = {}  # path -> (reason, kind, found)
        self.path: Path | None = None  # the CSV, once a Trainer gives the run folder

    def reject(self, problems: list[Problem], found: str = "setup") -> None:
        """Under `raise`, stop at the first; under `skip`, record them all."""
        if not problems:
            return
        if self.policy == "raise":
            raise BadImageError(one_line(problems[0], len(problems) - 1))
        for problem in problems:
            self.records.setdefault(problem.path, (problem.reason, problem.kind, found))

    def collect(self, batch):
        """Main process, every batch: take "skipped" out of the batch and record (or stop at) it."""
        if not isinstance(batch, dict) or "skipped" not in batch:
            return batch
        entries = batch.pop("skipped")
        problems = [Problem(path, reason) for entry in entries if entry for path, reason in json.loads(entry)]
        fresh = [p for p in problems if p.path not in self.records]
        if fresh:
            self.reject(fresh, found="loading")
            for problem in fresh:
                log.warning("skipped %s while loading: %s (%d skipped in all%s)", problem.path, problem.reason,
                            len(self.records), f"; list: {self.path}" if self.path else "")
            self.write()
        return batch

    def attach(self, trainer) -> None:
        """Write the list to the run folder from now on (one file per rank under DDP)."""
        if trainer is None:
            return
        rank = trainer.global_rank
        self.path = Path(trainer.default_root_dir) / (SKIP_LIST if rank == 0 else f"skipped_images.rank{rank}.csv")
        if self.records:
            self.write()
            log.warning("%d skipped files are listed in %s", len(self.records), self.path)

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason", "kind", "found"])
            writer.writerows([path, *record] for path, record in self.records.items())

    def as_rows(self) -> list[dict]:
        return [{"path": p, "reason": r, "kind": k, "found": f} for p, (r, k, f) in self.records.items()]


class SkipBadImages:
    """DataModule mixin: records, in the main process, what the workers skipped (see above).

    `on_before_batch_transfer` runs on every batch of every stage, before the device transfer
    (and so before NormalizeOnDevice's `on_after_batch_transfer`).
    """

    bad_files: BadFiles

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.bad_files.path is None:
            self.bad_files.attach(self.trainer)  # the run folder is known once a Trainer runs us
        return self.bad_files.collect(batch)
