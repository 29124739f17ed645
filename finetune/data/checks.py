"""What is in a data folder and what is wrong with it: per-file checks, and the report.

A DataModule screens its files as it is built, before the split (so a skipped file never lands
in a split, and a class left with no readable image fails at once, before the model is built):

- always, each file's header, which PIL reads without decoding: an empty file, not an image,
  a broken link, a decompression bomb (refused from the size its header claims, before a pixel
  is allocated), a truncated JPEG/PNG/WebP/BMP (its end marker or declared length missing:
  such a file alone is then decoded, to confirm);
- for a small set (headers adding up to at most SETUP_DECODE_PIXELS), every pixel too, the way
  training reads it (masks with their labels), and a content hash for duplicates.

`finetune check-data` does the second for any size (`screening("full")`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.bad_images import BadFile, BadFiles, Problem, read_guarded, reason_of
from finetune.data.images import read_rgb
from finetune.data.segmentation_folder import MASK_MODES, displayed_size, mask_mode_problem, read_mask

log = logging.getLogger(__name__)

# 1000 images of 224 px: decoding all of them costs about a second; above, headers only.
SETUP_DECODE_PIXELS = 50_000_000
MAX_EXAMPLES = 1000  # small images kept by path; the count goes on
_MODE: ContextVar[str] = ContextVar("screening", default="auto")


@contextmanager
def screening(mode: str):
    """Screen DataModules built inside with `full` (every pixel) or `headers` only, not by size."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


# --- one file ---------------------------------------------------------------------------------

@dataclass(slots=True)
class FileFacts:
    path: str
    height: int = 0
    width: int = 0
    mode: str = ""
    problem: str | None = None  # why it cannot be used
    digest: str | None = None  # of the bytes; full screening only
    labels: dict[int, int] | None = None  # mask value -> pixels; full screening of masks only


def _what_it_is(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<svg")):
        return "HTML/XML text"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "data PIL does not know"


def _looks_truncated(path: str, size: int, fmt: str) -> bool:
    """The end of the file disagrees with its format: a cut-off download or copy."""
    with open(path, "rb") as f:
        if fmt in ("JPEG", "MPO", "PNG"):
            f.seek(max(0, size - 1024))  # some writers pad or append a little after the end marker
            return (b"\xff\xd9" if fmt != "PNG" else b"IEND") not in f.read()
        if fmt in ("WEBP", "BMP"):
            f.seek(4 if fmt == "WEBP" else 2)
            declared = int.from_bytes(f.read(4), "little") + (8 if fmt == "WEBP" else 0)
            return size < declared
    return False


def inspect_header(path: str) -> FileFacts:
    """Size and mode from the header; `problem` set when the file cannot be an image we use."""
    facts = FileFacts(path)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        link = os.path.islink(path)
        facts.problem = f"broken symbolic link: points to {os.readlink(path)}" if link else "file not found"
        return facts
    except OSError as error:
        facts.problem = f"cannot be read: {error.strerror}"
        return facts
    size = status.st_size
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the reader
        facts.problem = "not a regular file"
        return facts
    if size == 0:
        facts.problem = "empty file (0 bytes)"
        return facts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                (facts.height, facts.width), facts.mode, fmt = displayed_size(image), image.mode, image.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        claimed = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        facts.problem = (f"decompression bomb: its header claims {claimed}, over PIL's limit of "
                         f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); refused without decoding")
        return facts
    except UnidentifiedImageError:
        facts.problem = f"not an image: {_what_it_is(path)} ({size:,} bytes)"
        return facts
    except Exception as error:  # noqa: BLE001 - any header a decoder chokes on
        facts.problem = f"unreadable header: {reason_of(error, path)}"
        return facts
    if _looks_truncated(path, size, fmt):
        try:
            with Image.open(path) as image:
                image.load()  # PIL refuses truncated data (some decoders fill it with grey)
        except Exception as error:  # noqa: BLE001
            facts.problem = f"truncated or corrupt: {reason_of(error, path)}"
    return facts


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()[:32]


def decode(facts: FileFacts, mask_labels: tuple[int, int] | None = None) -> None:
    """Read every pixel the way training does (a mask: with its label check); hash the bytes."""
    try:
        if mask_labels is None:
            array = read_guarded(read_rgb, facts.path)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise BadFile(facts.path, f"decoded to {array.dtype} {array.shape}, not HxWx3 uint8")
        else:
            array = read_guarded(read_mask, facts.path, *mask_labels)
            counts = np.bincount(array.ravel(), minlength=256)
            facts.labels = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    except BadFile as bad:
        facts.problem = bad.reason
        return
    facts.digest = _digest(facts.path)


# --- a DataModule's files -------------------------------------------------------------------------

class Screening:
    """Screens the files of a DataModule as it is built, and keeps what its report needs.

    `min_side`: images smaller than this are reported (the input size; for segmentation the
    network's output stride). `mask_labels`: (num_classes, ignore_index) of a segmentation set.
    """

    def __init__(self, bad_files: BadFiles, min_side: int, mask_labels: tuple[int, int] | None = None):
        self.bad_files = bad_files
        self.min_side = min_side
        self.mask_labels = mask_labels
        self.full = False
        self.decided = False
        self.facts: dict[str, FileFacts] = {}  # every file's, when screened in full
        self.small: list[FileFacts] = []
        self.small_count = 0
        self.files = 0
        self.seconds = 0.0

    def _decide(self, headers: list[FileFacts]) -> None:
        """Every pixel or headers only, once per DataModule, from the first (the training) files."""
        if self.decided:
            return
        self.decided = True
        mode = _MODE.get()
        if mode == "auto":
            self.full = sum(f.height * f.width for f in headers if f.problem is None) <= SETUP_DECODE_PIXELS
        else:
            self.full = mode == "full"

    def _note(self, facts: FileFacts, mask: bool = False) -> None:
        if self.full:
            if facts.problem is None:
                decode(facts, self.mask_labels if mask else None)
            self.facts[facts.path] = facts
        if facts.problem is None and not mask and min(facts.height, facts.width) < self.min_side:
            self.small_count += 1
            if len(self.small) < MAX_EXAMPLES:
                self.small.append(facts)

    def keep(self, paths: list[str]) -> set[str]:
        """The paths that can be used; the others are skipped (or raised) by the policy."""
        start = time.perf_counter()
        headers = [inspect_header(p) for p in paths]
        self._decide(headers)
        for facts in headers:
            self._note(facts)
        problems = [Problem(f.path, f.problem) for f in headers if f.problem is not None]
        self._done(len(paths), start)
        self.bad_files.reject(problems)
        return {f.path for f in headers if f.problem is None}

    def keep_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(image, mask) pairs whose two files can be used and agree in size; masks of class indices."""
        start = time.perf_counter()
        headers = [(inspect_header(i), inspect_header(m)) for i, m in pairs]
        self._decide([i for i, _ in headers])
        kept, problems = [], []
        for image, mask in headers:
            self._note(image)
            if image.problem is not None:
                problems.append(Problem(image.path, image.problem, "image"))
                continue
            if mask.problem is None and mask.mode not in MASK_MODES:
                mask.problem = mask_mode_problem(mask.mode)
            elif mask.problem is None and (image.height, image.width) != (mask.height, mask.width):
                mask.problem = (f"mask size differs from its image: mask is {mask.width}x{mask.height} but its image "
                                f"{image.path} is {image.width}x{image.height} (WxH); masks must match it pixel for pixel")
            self._note(mask, mask=True)
            if mask.problem is not None:
                problems.append(Problem(mask.path, mask.problem, "mask"))
            else:
                kept.append((image.path, mask.path))
        self._done(len(pairs) * 2, start)
        self.bad_files.reject(problems)
        return kept

    def drop(self, path: str | Path, reason: str, kind: str = "folder") -> None:
        self.bad_files.reject([Problem(str(path), reason, kind)])

    def _done(self, files: int, start: float) -> None:
        self.files += files
        self.seconds += time.perf_counter() - start


# --- the report -----------------------------------------------------------------------------

@dataclass
class DataReport:
    root: str
    datamodule: str
    checked: str = ""  # "headers" or "every pixel"
    files: int = 0
    seconds: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    pixels: dict[str, dict[str, float]] = field(default_factory=dict)  # segmentation: split -> class -> share
    imbalance: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    small: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _duplicates(screen: Screening, where: dict[str, tuple[str, str]]) -> list[dict]:
    """Groups of files with the same bytes; `where`: path -> (split, class)."""
    groups = defaultdict(list)
    for path, facts in screen.facts.items():
        if facts.digest is not None and path in where:
            groups[facts.digest].append(path)
    found = []
    for paths in sorted(sorted(g) for g in groups.values() if len(g) > 1):
        splits = sorted({where[p][0] for p in paths})
        classes = sorted({where[p][1] for p in paths})
        found.append({"paths": paths, "splits": splits, "classes": classes})
    return found


def _imbalance(counts: dict[str, int]) -> dict | None:
    present = {name: n for name, n in counts.items() if n > 0}
    if len(present) < 2:
        return None
    largest, smallest = max(present, key=present.get), min(present, key=present.get)
    return {"ratio": round(present[largest] / present[smallest], 2), "largest": largest, "smallest": smallest,
            "largest_count": present[largest], "smallest_count": present[smallest]}


def _finish(report: DataReport, screen: Screening, where: dict[str, tuple[str, str]], meaning: str) -> DataReport:
    report.checked = "every pixel" if screen.full else "headers"
    report.files, report.seconds = screen.files, round(screen.seconds, 3)
    report.skipped = screen.bad_files.as_rows()
    report.duplicates = _duplicates(screen, where)
    report.small = {
        "min_side": screen.min_side, "count": screen.small_count, "meaning": meaning,
        "examples": [{"path": f.path, "width": f.width, "height": f.height}
                     for f in sorted(screen.small, key=lambda f: min(f.height, f.width))[:20]],
    }
    w = report.warnings
    if report.skipped:
        w.append(f"{len(report.skipped)} files skipped: they cannot be used")
    if report.imbalance and report.imbalance["ratio"] >= 10:
        i = report.imbalance
        w.append(f"class imbalance: {i['largest']} has {i['ratio']}x the training images of {i['smallest']}")
    leaks = [d for d in report.duplicates if len(d["splits"]) > 1]
    conflicts = [d for d in report.duplicates if len(d["classes"]) > 1]
    if report.duplicates:
        w.append(f"{len(report.duplicates)} group(s) of identical files ({len(leaks)} across splits, "
                 f"{len(conflicts)} with different classes)")
    if screen.small_count:
        w.append(f"{screen.small_count} images smaller than {screen.min_side} px on a side")
    if "val" in report.counts and not sum(report.counts["val"].values()):
        w.append("no validation images")
    return report


def folder_report(root: str, datamodule: str, splits, screen: Screening) -> DataReport:
    """Classification and identity folders: `splits` is a FolderSplits."""
    report = DataReport(str(root), datamodule)
    where = {}
    for split in ("train", "val", "test"):
        names = splits.val_names if split == "val" and splits.val_names is not None else splits.class_names
        samples = getattr(splits, split)
        counts = Counter(label for _, label in samples)
        if samples or split != "test":
            report.counts[split] = {name: counts[i] for i, name in enumerate(names)}
        where.update({path: (split, names[label]) for path, label in samples})
    report.imbalance = _imbalance(report.counts["train"])
    report.fatal += [f"class {name!r} has no readable training image" for name, n in report.counts["train"].items()
                     if not n]
    return _finish(report, screen, where, "upscaled to the input size")


def segmentation_report(root: str, datamodule: str, splits: dict, class_names: list[str],
                        screen: Screening) -> DataReport:
    """Images per split; with every pixel read, the images and pixel share of each class."""
    report = DataReport(str(root), datamodule)
    where = {}
    for split, pairs in splits.items():
        if not pairs and split == "test":
            continue
        images, pixels = Counter(), Counter()
        for image, mask in pairs:
            where[image] = (split, "")
            facts = screen.facts.get(mask)
            for value, n in ((facts.labels or {}) if facts else {}).items():
                if value < len(class_names):
                    images[value] += 1
                    pixels[value] += n
        total = sum(pixels.values())
        per_class = {name: images[i] for i, name in enumerate(class_names)}
        report.counts[split] = per_class if screen.full else {"images": len(pairs)}
        if total:
            report.pixels[split] = {name: round(pixels[i] / total, 4) for i, name in enumerate(class_names)}
    if report.pixels.get("train"):
        report.imbalance = _imbalance({k: round(v * 1e6) for k, v in report.pixels["train"].items()})
        if report.imbalance:
            report.imbalance.update(measure="pixels")
    if not splits.get("train"):
        report.fatal.append("no readable image/mask pair for training")
    return _finish(report, screen, where, "below the network's output stride: little context, padded in batches")


def log_report(report: DataReport) -> None:
    """The report as a few log lines: what a run's log should say about its data."""
    log.info("%s: %s of %d files checked in %.2f s", report.root, report.checked, report.files, report.seconds)
    if report.imbalance and report.imbalance["ratio"] > 1:
        i = report.imbalance
        log.info("largest class %s is %.1fx the smallest, %s (%s)", i["largest"], i["ratio"], i["smallest"],
                 "by pixels" if i.get("measure") else f"{i['largest_count']} vs {i['smallest_count']} training images")
    if report.skipped:
        kinds = Counter(re.split(r"[:;(]", s["reason"])[0].strip() for s in report.skipped)
        shown = ", ".join(os.path.relpath(s["path"], report.root) for s in report.skipped[:3])
        more = f" and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
        log.warning("skipped %d unusable files (%s): %s%s; `finetune check-data` shows why", len(report.skipped),
                    ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()), shown, more)
    for duplicate in report.duplicates[:3]:
        log.warning("identical files (%s; %s): %s", "/".join(duplicate["splits"]), "/".join(duplicate["classes"]) or "-",
                    " = ".join(os.path.relpath(p, report.root) for p in duplicate["paths"]))
    if len(report.duplicates) > 3:
        log.warning("%d more groups of identical files: `finetune check-data` lists them", len(report.duplicates) - 3)
    small = report.small
    if small.get("count"):
        first = small["examples"][0]
        log.info("%d images are smaller than %d px on a side (smallest %dx%d: %s)", small["count"], small["min_side"],
                 first["width"], first["height"], os.path.relpath(first["path"], report.root))

