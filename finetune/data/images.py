"""Read any image a user's folder may hold as an 8-bit RGB array, JPEGs fast.

JPEGs, most of any photo folder, are decoded by OpenCV (libjpeg-turbo, faster than PIL,
bit-identical pixels) and, when the caller allows it, at 1/2, 1/4 or 1/8 scale in the
DCT (`shrink`): several times faster for large photos, and used only where the smaller image
still covers every crop at the size the model takes, so the model sees the same picture.
Everything else (PNG, 16-bit, palette, CMYK JPEGs) goes through PIL. Training crops of JPEGs
skip most of this: finetune/data/crop_first.py decodes only the crop.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple, Protocol

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_REDUCED_RGB = {  # OpenCV's reduced-decode flags, asking for RGB instead of its default BGR
    factor: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB
    for factor, flag in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2),
                         (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))
}


class Shrink(Protocol):
    def __call__(self, width: int, height: int) -> int:
        """The largest decode reduction (1, 2, 4 or 8) that loses nothing the model will see."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips 16-bit values at 255 instead of scaling them.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("P", "PA", "LA", "RGBA") and (image.mode != "P" or "transparency" in image.info):
        # Composite transparency onto white, the way a viewer shows it, not onto whatever
        # colour the transparent pixels happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


class JpegHeader(NamedTuple):
    width: int  # as stored, before the EXIF orientation
    height: int
    components: int  # 1 grey, 3 colour, 4 CMYK
    orientation: int = 1  # EXIF orientation, 1-8 (1: as stored)

    @property
    def turned(self) -> bool:
        """A quarter turn (orientations 5-8): width and height swap when shown."""
        return self.orientation >= 5


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Size, colour components and EXIF orientation from a JPEG's markers, or None when `data`
    is not a JPEG. Reading it costs microseconds; PIL's Image.open costs ~0.1 ms, a sixth of
    decoding a 500x375 photo."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, orientation = 2, 1
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and orientation == 1:  # APP1 (Exif; XMP segments give 1): the first turn found counts
            orientation = _exif_orientation(data[i + 4:i + 2 + length])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 (not DHT, JPG, DAC)
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return JpegHeader(width, height, data[i + 9], orientation)
        i += 2 + length
    return None


def _exif_orientation(segment: bytes) -> int:
    """Tag 0x0112 of IFD0 in an APP1 segment's TIFF structure; 1 when absent or out of range."""
    if segment[:6] != b"Exif\x00\x00" or segment[6:8] not in (b"II", b"MM"):
        return 1
    tiff = segment[6:]
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)  # a SHORT, left-justified in the field
            return value if 1 <= value <= 8 else 1
    return 1


def check_jpeg_size(path: str | Path, header: JpegHeader) -> None:
    """Refuse a decompression bomb from its header, before any pixel is decoded, at PIL's limit."""
    if header.width * header.height > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{path}: {header.width}x{header.height} pixels exceeds the limit of {2 * Image.MAX_IMAGE_PIXELS} "
            "(decompression bomb)"
        )


def decode_factor(header: JpegHeader, shrink: Shrink | None) -> int:
    """The DCT reduction OpenCV decodes `header`'s image at (1 without `shrink`)."""
    factor = shrink(header.width, header.height) if shrink is not None else 1
    return factor if factor in _REDUCED_RGB else 1


def _decode_jpeg(path: str | Path, data: bytes, factor: int) -> np.ndarray:
    # OpenCV applies the EXIF orientation itself, as PIL's exif_transpose does (all 8 cases).
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_RGB[factor])
    if pixels is None:
        raise OSError(f"{path}: OpenCV could not decode this JPEG (truncated or corrupt)")
    return pixels


def read_bytes(path: str | Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def read_rgb(path: str | Path, shrink: Shrink | None = None) -> np.ndarray:
    """HxWx3 uint8 array with EXIF orientation applied (phone photos are stored rotated)."""
    return decode_rgb(path, read_bytes(path), shrink)


def decode_rgb(path: str | Path, data: bytes, shrink: Shrink | None = None) -> np.ndarray:
    """`read_rgb` of a file already read into `data`.

    Grayscale and colour JPEGs go to OpenCV, with the size read from the JPEG's own header
    (a decompression bomb is refused there); CMYK JPEGs (PIL converts them exactly) and other
    formats go to PIL.
    """
    header = jpeg_header(data)
    if header is not None and header.components in (1, 3):
        check_jpeg_size(path, header)
        return _decode_jpeg(path, data, decode_factor(header, shrink))
    # From the bytes, not the name: they may come from a shard, not a file. Callers name the
    # file in errors (finetune.data.bad_images.read_guarded).
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        # np.array, not asarray: PIL's buffer is read-only, and torch.from_numpy needs to own it.
        return np.array(_to_rgb(image))
