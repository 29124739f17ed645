"""The folder listing: string paths in the order Path objects sort in, so that the splits drawn
from it are the ones earlier versions drew."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from finetune.data.folder import list_image_paths
from finetune.data.images import is_image_file

NAMES = ["a.png", "B.jpg", "a-b.png", "a_b.png", "ab", "x.PNG", ".h.png", "z.txt", "a.b.jpeg", "Z.png", "a b.png", "a0.png"]
FOLDERS = ["a", "a b", "a-", "A", "ab", ".hidden", "a/b", "a/b/c", "ab/a-", "a-/x", "a0", "a.png.d"]


def path_sorted_walk(folder: Path) -> list[str]:
    """The listing as it was: os.walk (links followed once, hidden folders not), Paths sorted."""
    files, seen = [], set()
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        subdirectories[:] = [] if real in seen else sorted(d for d in subdirectories if not d.startswith("."))
        if real not in seen:
            seen.add(real)
            files += [Path(directory) / name for name in names]
    files.sort()
    return [str(p) for p in files if is_image_file(p)]


@pytest.mark.parametrize("seed", range(4))
def test_listing_is_the_path_sorted_walk(tmp_path, seed):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for name in random.Random(seed).sample(NAMES, 7):
            if not (tmp_path / folder / name).exists():  # "ab" may be a folder already
                (tmp_path / folder / name).write_bytes(b"x")
    for name in NAMES:
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "link")  # a linked folder: listed once
    os.symlink(tmp_path / "nowhere.png", tmp_path / "a" / "broken.png")  # listed, for the checks to report
    listed = list_image_paths(tmp_path)
    assert listed == path_sorted_walk(tmp_path)
    assert str(tmp_path / "a" / "broken.png") in listed and not any("/." in p for p in listed)
