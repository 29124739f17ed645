"""Decode one region of a JPEG, through libjpeg-turbo's TurboJPEG 3 API (ctypes).

RandomResizedCrop keeps on average about half of a photo, yet a full decode pays for every
pixel. libjpeg-turbo can skip the rows above a region without their inverse DCT, stop after
its last row, and convert only its columns (`tj3SetCroppingRegion`); neither OpenCV nor PIL
exposes that. The library comes from the `turbojpeg` wheel (it bundles libturbojpeg 3) or the
system; without either, `decoder()` is None and callers decode the whole image with OpenCV.

The pixels of a region are those of the same region of a full decode, bit for bit
(tests/test_crop_first.py): the region asked of libjpeg-turbo starts one iMCU left of the
box and ends one column right of it, so that smooth chroma upsampling has the same
neighbours at the box's edges as in the full image, and is then sliced to the box.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_DECOMPRESS = 1  # TJINIT_DECOMPRESS
# enum TJPARAM (turbojpeg.h, TurboJPEG 3): the values are part of its stable ABI.
_STOPONWARNING, _SUBSAMP, _JPEGWIDTH, _JPEGHEIGHT, _PRECISION, _COLORSPACE = 0, 4, 5, 6, 7, 8
_PIXEL_RGB = 0  # TJPF_RGB; libjpeg-turbo expands greyscale JPEGs to RGB itself, as OpenCV does
_COLORSPACES_RGB = (0, 1, 2)  # TJCS_RGB, TJCS_YCbCr, TJCS_GRAY (not CMYK/YCCK)
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)  # tjMCUWidth, by TJSAMP (444, 422, 420, GRAY, 440, 411, 441)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scale(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def _candidates() -> list[str]:
    """The libturbojpeg bundled in the `turbojpeg` wheel, then the system's."""
    paths = []
    try:
        files = metadata.files("turbojpeg") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        name = Path(str(file)).name  # libturbojpeg-<hash>.so.0.3.0, libturbojpeg.0.3.0.dylib, turbojpeg-<hash>.dll
        is_library = any(suffix in name for suffix in (".so", ".dylib", ".dll")) and "cpython" not in name
        if "turbojpeg" in name and is_library:
            paths.append(str(file.locate()))
    system = ctypes.util.find_library("turbojpeg")
    return paths + ([system] if system else [])


def _load() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.tj3Init  # TurboJPEG 3 (libjpeg-turbo >= 3.0); 2.x has no cropped decoding
        except (OSError, AttributeError):
            continue
        lib.tj3Init.restype, lib.tj3Init.argtypes = ctypes.c_void_p, [ctypes.c_int]
        lib.tj3Destroy.argtypes = [ctypes.c_void_p]
        lib.tj3Set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.tj3Get.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.tj3DecompressHeader.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.tj3SetScalingFactor.argtypes = [ctypes.c_void_p, _Scale]
        lib.tj3SetCroppingRegion.argtypes = [ctypes.c_void_p, _Region]
        lib.tj3Decompress8.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ]
        log.debug("region JPEG decoding with %s", path)
        return lib
    log.info("libturbojpeg 3 not found (pip install turbojpeg): JPEGs are decoded whole, by OpenCV")
    return None


class RegionDecoder:
    """One TurboJPEG decompressor per thread (DataLoader workers are processes with their own)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.path = lib, lib._name
        self._local = threading.local()

    def _handle(self) -> int:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self.lib.tj3Init(_DECOMPRESS)
            if not handle:
                raise OSError("tj3Init failed")
            self.lib.tj3Set(handle, _STOPONWARNING, 1)  # a damaged file goes to the OpenCV path whole
            self._local.handle = handle
        return handle

    def decode(self, data: bytes, box: tuple[int, int, int, int], factor: int = 1) -> np.ndarray | None:
        """RGB pixels of `box` = (x1, y1, x2, y2), in the coordinates of the image as stored
        (no EXIF orientation) and decoded at 1/`factor` scale; None where libjpeg-turbo cannot
        (not 8-bit, CMYK, damaged): the caller then decodes the whole image another way."""
        lib, handle = self.lib, self._handle()
        if lib.tj3DecompressHeader(handle, data, len(data)) != 0:
            return None
        if lib.tj3Get(handle, _PRECISION) != 8 or lib.tj3Get(handle, _COLORSPACE) not in _COLORSPACES_RGB:
            return None
        subsampling = lib.tj3Get(handle, _SUBSAMP)
        if not 0 <= subsampling < len(_MCU_WIDTH) or lib.tj3SetScalingFactor(handle, _Scale(1, factor)) != 0:
            return None
        width = -(-lib.tj3Get(handle, _JPEGWIDTH) // factor)  # TJSCALED rounds up
        x1, y1, x2, y2 = box
        mcu = -(-_MCU_WIDTH[subsampling] // factor)
        left = max(0, (x1 - 1) // mcu * mcu)  # on an iMCU boundary, with a column of context
        right = min(width, x2 + 1)
        if lib.tj3SetCroppingRegion(handle, _Region(left, y1, right - left, y2 - y1)) != 0:
            return None
        out = np.empty((y2 - y1, right - left, 3), np.uint8)
        if lib.tj3Decompress8(handle, data, len(data), out.ctypes.data, 0, _PIXEL_RGB) != 0:
            return None
        return out[:, x1 - left:x2 - left]


@functools.cache
def decoder() -> RegionDecoder | None:
    """The process's RegionDecoder, or None without libturbojpeg 3."""
    lib = _load()
    return RegionDecoder(lib) if lib is not None else None
