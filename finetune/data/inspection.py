"""One file, inspected: what its header says (size, mode, what is wrong with it) without
decoding, and, when asked, every pixel decoded the way training reads it, with a content hash.

The header catches an empty file, not an image, a broken link, a decompression bomb (refused
from the size its header claims, before a pixel is allocated), a truncated JPEG/PNG/WebP/BMP
(its end marker or declared length missing: such a file alone is then decoded, to confirm).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.bad_images import BadFile, read_guarded, reason_of
from finetune.data.images import read_rgb
from finetune.data.segmentation_folder import displayed_size, read_mask


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
