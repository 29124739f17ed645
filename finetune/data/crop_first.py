"""Crop before decoding: a training transform that starts with RandomResizedCrop draws its box
from the image size alone, so the box can be drawn from the JPEG header and only the box
decoded (finetune/data/region_decode.py). At the default scale (0.25, 1) a 500x375 photo's
average box decodes in ~80 % of the whole image's time (rows above the box must still be
Huffman-decoded), and a training sample takes ~25 % less time (benchmarks/README.md).

The output is the albumentations Compose's, bit for bit, for the same seed: the same random
draws in the same order (Compose's own `p`, the crop, then the later steps), the same box,
and, inside it, the same pixels as a full decode (tests/test_crop_first.py). Files the region
decoder cannot take (PNG, CMYK, damaged JPEGs, no libturbojpeg) are decoded whole and cropped
with the same box.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np

from finetune.data import region_decode
from finetune.data.images import (
    JpegHeader,
    Shrink,
    check_jpeg_size,
    decode_factor,
    decode_rgb,
    jpeg_header,
    read_bytes,
)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2, as albumentations' crop_coords
# EXIF orientation -> (transpose, flip rows, flip columns): applied in that order to the pixels
# as stored, they give the image as shown (what PIL's exif_transpose and OpenCV return).
ORIENTATIONS = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
    5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}


def stored_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """`box` of the image as shown (`width` x `height`) in the coordinates of the pixels as stored."""
    transpose, flip_rows, flip_columns = ORIENTATIONS[orientation]
    x1, y1, x2, y2 = box
    if flip_columns:
        x1, x2 = width - x2, width - x1
    if flip_rows:
        y1, y2 = height - y2, height - y1
    return (y1, x1, y2, x2) if transpose else (x1, y1, x2, y2)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (of the whole image or of a stored_box) as shown."""
    if orientation == 1:
        return pixels  # OpenCV resizes a view with a row stride as it is; a copy costs ~50 us
    transpose, flip_rows, flip_columns = ORIENTATIONS[orientation]
    if transpose:
        pixels = pixels.transpose(1, 0, 2)
    if flip_rows:
        pixels = pixels[::-1]
    if flip_columns:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def _shown_size(header: JpegHeader, factor: int) -> tuple[int, int]:
    """(height, width) of the image as shown, decoded at 1/factor (libjpeg rounds up)."""
    width, height = -(-header.width // factor), -(-header.height // factor)
    return (width, height) if header.turned else (height, width)


class CropFirst:
    """Runs `transform` (an A.Compose whose first step is RandomResizedCrop) on an image file,
    decoding only the crop where the file allows it. See the module docstring."""

    def __init__(self, transform: A.Compose):
        if not self.applies(transform):
            raise ValueError("CropFirst needs an A.Compose that starts with RandomResizedCrop (p=1)")
        self.compose = transform
        self.crop: A.RandomResizedCrop = transform.transforms[0]
        self.rest = transform.transforms[1:]

    @staticmethod
    def applies(transform) -> bool:
        steps = getattr(transform, "transforms", None)
        return (
            isinstance(transform, A.Compose) and transform.p >= 1 and bool(steps)
            and isinstance(steps[0], A.RandomResizedCrop) and steps[0].p >= 1
            and not transform.processors  # no boxes or keypoints to move along
        )

    def read(self, path: str | Path, shrink: Shrink | None = None) -> np.ndarray:
        """The RandomResizedCrop output for the file at `path` (HxWx3 uint8, the crop size)."""
        return self.read_bytes(path, read_bytes(path), shrink)

    def read_bytes(self, path: str | Path, data: bytes, shrink: Shrink | None = None) -> np.ndarray:
        """`read` of a file's bytes already in memory (a shard's sample); `path` names it in errors."""
        # Compose.__call__ draws once for its own probability before its first step.
        self.compose.py_random.random()
        header, decoder = jpeg_header(data), region_decode.decoder()
        box = size = None
        if header is not None and header.components in (1, 3):
            check_jpeg_size(path, header)
            factor = decode_factor(header, shrink)
            size = _shown_size(header, factor)
            box = self._draw(size)
            if decoder is not None:
                stored = stored_box(box, header.orientation, size[1], size[0])
                region = decoder.decode(data, stored, factor)
                if region is not None:
                    region = orient(region, header.orientation)
                    return self.crop.apply(region, crop_coords=(0, 0, region.shape[1], region.shape[0]))
        image = decode_rgb(path, data, shrink)
        if box is None or image.shape[:2] != size:
            box = self._draw(image.shape[:2])
        return self.crop.apply(image, crop_coords=box)

    def finish(self, image: np.ndarray):
        """The steps after the crop (flip, ToTensorV2, ...) on `read`'s output: the Compose's result."""
        data = {"image": image}
        for step in self.rest:
            data = step(**data)
        return data["image"]

    def _draw(self, size: tuple[int, int]) -> Box:
        return self.crop.get_params_dependent_on_data({"shape": size}, {})["crop_coords"]
