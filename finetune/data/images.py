"""Read any image a user's folder may hold as an 8-bit RGB array, JPEGs fast.

JPEGs, most of any photo folder, are decoded by OpenCV (libjpeg-turbo, about 1.5x PIL's
speed, bit-identical pixels) and, when the caller allows it, at 1/2, 1/4 or 1/8 scale in the
DCT (`shrink`): several times faster for large photos, and used only where the smaller image
still covers every crop at the size the model takes, so the model sees the same picture.
Everything else (PNG, 16-bit, palette, CMYK, EXIF-rotated JPEGs) goes through PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_REDUCED_RGB = {  # OpenCV's reduced-decode flags, asking for RGB instead of its default BGR
    factor: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    for factor, flag in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2),
                         (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))
}
_EXIF_ORIENTATION = 0x0112


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


def _plain_jpeg(image: Image.Image) -> bool:
    """An upright RGB or grayscale JPEG: OpenCV decodes it exactly as PIL would."""
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    )


def _decode_jpeg(path: str | Path, factor: int) -> np.ndarray:
    pixels = cv2.imdecode(np.fromfile(path, dtype=np.uint8), _REDUCED_RGB[factor])
    if pixels is None:
        raise OSError(f"{path}: OpenCV could not decode this JPEG (truncated or corrupt)")
    return pixels


def read_rgb(path: str | Path, shrink: Shrink | None = None) -> np.ndarray:
    """HxWx3 uint8 array with EXIF orientation applied (phone photos are stored rotated).

    Opening with PIL reads only the header: it gives the format and size, and refuses
    decompression bombs before any pixel is decoded.
    """
    with Image.open(path) as image:
        if _plain_jpeg(image):
            factor = shrink(*image.size) if shrink is not None else 1
            return _decode_jpeg(path, factor if factor in _REDUCED_RGB else 1)
        image = ImageOps.exif_transpose(image)
        # np.array, not asarray: PIL's buffer is read-only, and torch.from_numpy needs to own it.
        return np.array(_to_rgb(image))
