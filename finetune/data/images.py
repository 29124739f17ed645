"""Read any image a user's folder may hold as an 8-bit RGB array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


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


def read_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 array with EXIF orientation applied (phone photos are stored rotated)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return np.asarray(_to_rgb(image))
