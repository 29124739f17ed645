"""A DataModule's files, screened as it is built, before the split (so a skipped file never lands
in a split, and a class left with no readable image fails at once, before the model is built):

- always, each file's header, which PIL reads without decoding (finetune.data.inspection);
- for a small set (headers adding up to at most SETUP_DECODE_PIXELS), every pixel too, the way
  training reads it (masks with their labels), and a content hash for duplicates.

`finetune check-data` does the second for any size (`screening("full")`). What a file's
screening found is kept on disk and shared (finetune.data.screening_cache): a file is opened
again only when it changed, and only by one process of a run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.data.bad_images import BadFiles, Problem
from finetune.data.inspection import FileFacts, decode, inspect_header
from finetune.data.segmentation_folder import MASK_MODES, mask_mode_problem

if TYPE_CHECKING:
    from finetune.data.screening_cache import SharedScreening

# 1000 images of 224 px: decoding all of them costs about a second; above, headers only.
SETUP_DECODE_PIXELS = 50_000_000
MAX_EXAMPLES = 1000  # small images kept by path; the count goes on


@dataclass(frozen=True)
class ScreeningRequest:
    mode: str = "auto"  # "full", "headers", or "auto": by the size of the set
    min_side: int | None = None
    refresh_cache: bool = False  # screen every file again, whatever the cache holds


_ASKED: ContextVar[ScreeningRequest] = ContextVar("screening", default=ScreeningRequest())


@contextmanager
def screening(mode: str, min_side: int | None = None, refresh_cache: bool = False):
    """Screen DataModules built inside with `full` (every pixel) or `headers` only, not by size.

    `min_side`: report the images smaller than this instead of the DataModule's own smallest
    side (check-data: a segmentation network's output stride, which the DataModule does not know).
    `refresh_cache`: open every file again and rewrite the screening cache."""
    token = _ASKED.set(ScreeningRequest(mode, min_side, refresh_cache))
    try:
        yield
    finally:
        _ASKED.reset(token)


def requested() -> ScreeningRequest:
    """What the innermost `screening(...)` asks (defaults outside any)."""
    return _ASKED.get()


class Screening:
    """Screens the files of a DataModule as it is built, and keeps what its report needs.

    `min_side`: images smaller than this are reported (the input size; for segmentation the
    network's output stride), unless `screening(..., min_side=)` asks for another.
    `mask_labels`: (num_classes, ignore_index) of a segmentation set. `shared`: the screening
    cache of the data (finetune.data.screening_cache), None to open every file here.
    """

    def __init__(self, bad_files: BadFiles, min_side: int, mask_labels: tuple[int, int] | None = None,
                 shared: SharedScreening | None = None):
        self.bad_files = bad_files
        self.shared = shared
        self.min_side = _ASKED.get().min_side or min_side
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
        mode = _ASKED.get().mode
        if mode == "auto":
            self.full = sum(f.height * f.width for f in headers if f.problem is None) <= SETUP_DECODE_PIXELS
        else:
            self.full = mode == "full"

    def _headers(self, paths: list[str]) -> list[FileFacts]:
        if self.shared is None:
            return [inspect_header(p) for p in paths]
        return self.shared.headers(paths, inspect_header)

    def _note(self, facts: FileFacts, mask: bool = False) -> None:
        if self.full:
            if facts.problem is None:
                labels = self.mask_labels if mask else None
                if self.shared is None:
                    decode(facts, labels)
                else:
                    self.shared.decode(facts, labels, decode)
            self.facts[facts.path] = facts
        if facts.problem is None and not mask and min(facts.height, facts.width) < self.min_side:
            self.small_count += 1
            if len(self.small) < MAX_EXAMPLES:
                self.small.append(facts)

    def keep(self, paths: list[str]) -> set[str]:
        """The paths that can be used; the others are skipped (or raised) by the policy."""
        start = time.perf_counter()
        headers = self._headers(paths)
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
        headers = list(zip(self._headers([i for i, _ in pairs]), self._headers([m for _, m in pairs])))
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
