"""The fast input path (OpenCV decode, DCT shrink, uint8 out, normalised on the device) shows
the model the same pictures as the reference path (PIL full decode, float normalised in the
worker): same crop and flip statistics, same pixel statistics, and, with the same random
draws, nearly the same pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.images import read_rgb
from finetune.data.normalize import normalize_images
from finetune.data.transforms import CropShrink, ResizeShrink, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, SCALE = 64, (0.25, 1.0)
DRAWS = 320


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """640x480 JPEGs with left/right structure (so a flip shows in the pixels) and texture."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        x = np.linspace(0, 1, 640)[None, :, None]
        y = np.linspace(0, 1, 480)[:, None, None]
        colour = rng.uniform(40, 215, (1, 1, 3))
        image = colour * (0.5 + x) * (0.8 + 0.4 * y) + rng.normal(0, 10, (480, 640, 3))
        image[:, : 100 + 20 * i] *= 0.5  # a dark band on the left
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def reference_read(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def draws(paths: list[str], fast: bool, seed: int) -> dict[str, np.ndarray]:
    """Crop area fraction, log aspect, flip, and the normalised output, per draw."""
    transform = train_transform(SIZE, MEAN, STD, SCALE, normalize=not fast)
    transform.save_applied_params = True
    shrink = CropShrink(SIZE, SCALE[0])
    areas, aspects, flips, images = [], [], [], []
    for k in range(DRAWS):
        pixels = read_rgb(paths[k % len(paths)], shrink) if fast else reference_read(paths[k % len(paths)])
        transform.set_random_seed(seed + k)
        out = transform(image=pixels)
        params = dict(out["applied_transforms"])
        x1, y1, x2, y2 = params["RandomResizedCrop"]["crop_coords"]
        height, width = pixels.shape[:2]
        areas.append((x2 - x1) * (y2 - y1) / (width * height))
        aspects.append(math.log((x2 - x1) / (y2 - y1)))
        flips.append("HorizontalFlip" in params)
        image = out["image"]
        images.append(normalize_images(image[None], MEAN, STD)[0] if fast else image)
    return {"area": np.array(areas), "aspect": np.array(aspects), "flip": np.array(flips), "image": torch.stack(images)}


def test_fast_path_decodes_smaller_only_where_the_crop_stays_covered(photos):
    shrink = CropShrink(SIZE, SCALE[0])
    assert shrink(640, 480) == 2  # the smallest crop, 240 px, is still >= 64 px at 1/2, not at 1/4
    assert read_rgb(photos[0], shrink).shape == (240, 320, 3)
    assert CropShrink(224, 0.25)(500, 375) == 1  # a 500x375 photo at 224 px: never shrunk
    assert ResizeShrink(256)(1600, 1200) == 4 and ResizeShrink(256)(500, 375) == 1
    full = read_rgb(photos[0])
    np.testing.assert_array_equal(full, reference_read(photos[0]))  # OpenCV and PIL decode alike


def test_fast_and_reference_paths_agree_in_distribution(photos):
    fast, reference = draws(photos, fast=True, seed=10_000), draws(photos, fast=False, seed=0)
    # independent draws: crop scale and aspect, flip rate, pixel statistics
    assert abs(fast["area"].mean() - reference["area"].mean()) < 0.05  # each about 0.52 (sd of the mean ~0.012)
    assert abs(fast["aspect"].mean() - reference["aspect"].mean()) < 0.06
    assert abs(fast["flip"].mean() - reference["flip"].mean()) < 0.12 and 0.38 < fast["flip"].mean() < 0.62
    for stat in (torch.mean, torch.std):
        a = stat(fast["image"], dim=(0, 2, 3))
        b = stat(reference["image"], dim=(0, 2, 3))
        torch.testing.assert_close(a, b, atol=0.06, rtol=0.06)


def test_same_draws_give_nearly_the_same_pixels(photos):
    fast, reference = draws(photos, fast=True, seed=0), draws(photos, fast=False, seed=0)
    # the same random numbers pick the same crop, relative to the image, and the same flips
    np.testing.assert_allclose(fast["area"], reference["area"], atol=0.02)
    np.testing.assert_array_equal(fast["flip"], reference["flip"])
    difference = (fast["image"] - reference["image"]).abs()
    # pixels differ only by resampling from a half-size decode: a few grey levels, not content
    assert difference.mean() < 0.08, difference.mean()  # normalised units: 0.08 is about 5 of 255
    other = (fast["image"] - reference["image"].roll(1, dims=0)).abs().mean()
    assert other > 4 * difference.mean()  # whereas a different draw differs by far more


def test_jpeg_header_reads_size_and_components_like_pil(tmp_path):
    from finetune.data.images import jpeg_header

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # a big APP1 segment before the frame header
    cases = {
        "baseline.jpg": (image, {"exif": exif.tobytes()}),
        "progressive.jpg": (image, {"progressive": True}),
        "grey.jpg": (image.convert("L"), {}),
        "cmyk.jpg": (image.convert("CMYK"), {}),
    }
    for name, (picture, options) in cases.items():
        picture.save(tmp_path / name, quality=90, **options)
        with Image.open(tmp_path / name) as opened:
            expected = (*opened.size, len(opened.getbands()), opened.getexif().get(0x0112, 1))
        assert jpeg_header((tmp_path / name).read_bytes()) == expected, name
    image.save(tmp_path / "x.png")
    assert jpeg_header((tmp_path / "x.png").read_bytes()) is None
    # EXIF orientation 6 (a quarter turn) is applied on the OpenCV path too
    assert read_rgb(tmp_path / "baseline.jpg").shape == (53, 37, 3)


def test_a_jpeg_claiming_enormous_dimensions_is_refused_before_decoding(tmp_path):
    data = bytearray((Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg") or (tmp_path / "a.jpg").read_bytes()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")  # 3.6 gigapixels
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    with pytest.raises(Image.DecompressionBombError, match="bomb.jpg"):
        read_rgb(tmp_path / "bomb.jpg")


def test_planar_tensor_step_gives_what_to_tensor_v2_gives():
    from albumentations.pytorch import ToTensorV2

    from finetune.data.transforms import ToPlanarTensor

    rng = np.random.default_rng(0)
    for shape, dtype in (((5, 7, 3), np.uint8), ((5, 7, 3), np.float32), ((5, 7), np.uint8), ((5, 7, 4), np.uint8)):
        image = (rng.random(shape) * 255).astype(dtype)
        planar, reference = ToPlanarTensor()(image=image)["image"], ToTensorV2()(image=image)["image"]
        assert planar.is_contiguous() and planar.dtype == reference.dtype
        assert torch.equal(planar, reference), shape
