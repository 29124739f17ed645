"""Crop first: decoding only RandomResizedCrop's box gives the model exactly what the
albumentations Compose gives on the whole decoded image, for every kind of JPEG and EXIF
orientation; files the region decoder cannot take fall back to a full decode."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from finetune.data import region_decode
from finetune.data.classification import ImageDataset, ImageFolderDataModule
from finetune.data.crop_first import CropFirst
from finetune.data.images import jpeg_header, read_rgb
from finetune.data.transforms import CropShrink, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FACTOR_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Colour gradients, sharp edges and noise: chroma that upsampling has to interpolate."""
    x, y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    image = rng.uniform(30, 220, 3) * (0.4 + x) * (0.6 + 0.5 * y) + rng.normal(0, 12, (height, width, 3))
    image[rng.integers(0, height):, : rng.integers(1, width)] *= 0.4
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", orientation: int = 1, **options) -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


VARIANTS = {  # name -> (PIL mode, save options)
    "4:2:0": ("RGB", {"subsampling": 2}),
    "4:2:2": ("RGB", {"subsampling": 1}),
    "4:4:4": ("RGB", {"subsampling": 0}),
    "progressive": ("RGB", {"subsampling": 2, "progressive": True}),
    "grey": ("L", {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_decoded_region_is_the_same_region_of_a_full_decode(variant):
    decoder = region_decode.decoder()
    assert decoder is not None, "libturbojpeg 3 not found: pip install turbojpeg (a dependency of finetune)"
    mode, options = VARIANTS[variant]
    rng = np.random.default_rng(len(variant))
    for trial in range(40):
        width, height = (int(v) for v in rng.integers(17, 420, 2))
        data = _jpeg(_photo(rng, width, height), mode, **options)
        factor = (1, 1, 2, 4, 8)[trial % 5]
        full = cv2.imdecode(np.frombuffer(data, np.uint8), (FACTOR_FLAGS[factor] & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB)
        h, w = full.shape[:2]
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        region = decoder.decode(data, (x1, y1, x2, y2), factor)
        assert region is not None and region.shape == (y2 - y1, x2 - x1, 3), (variant, trial)
        np.testing.assert_array_equal(region, full[y1:y2, x1:x2], err_msg=f"{variant} {width}x{height} 1/{factor}")


def _image_files(folder) -> dict[str, str]:
    """One file of each kind a folder may hold, with odd sizes; EXIF orientations 1-8."""
    rng = np.random.default_rng(0)
    files = {}
    for orientation in range(1, 9):
        files[f"exif{orientation}.jpg"] = _jpeg(_photo(rng, 301, 203), orientation=orientation)
    for name, (mode, options) in VARIANTS.items():
        files[f"{name}.jpg"] = _jpeg(_photo(rng, 257, 331), mode, **options)
    files["large.jpg"] = _jpeg(_photo(rng, 900, 700))  # decoded at 1/2 under CropShrink(64, 0.25)
    files["large_turned.jpg"] = _jpeg(_photo(rng, 700, 900), orientation=6)
    files["cmyk.jpg"] = _jpeg(_photo(rng, 120, 90), "CMYK")  # PIL's path
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    Image.fromarray(_photo(rng, 150, 111)).save(folder / "photo.png")
    paths["photo.png"] = str(folder / "photo.png")
    return paths


def test_crop_first_gives_the_composes_output_bit_for_bit(tmp_path, monkeypatch):
    paths = _image_files(tmp_path)
    shrink = CropShrink(64, 0.25)
    transform = train_transform(64, MEAN, STD, (0.25, 1.0), normalize=False)
    crop_first = CropFirst(transform)
    decoded = []
    real_decode = region_decode.RegionDecoder.decode
    monkeypatch.setattr(region_decode.RegionDecoder, "decode",
                        lambda self, *a: decoded.append(1) or real_decode(self, *a))
    for name, path in paths.items():
        for seed in range(6):
            transform.set_random_seed(seed)
            expected = transform(image=read_rgb(path, shrink))["image"]
            transform.set_random_seed(seed)
            got = crop_first.finish(crop_first.read(path, shrink))
            assert torch.equal(got, expected), (name, seed)
    assert len(decoded) == 6 * (len(paths) - 2)  # every JPEG but CMYK went through the region decoder
    # without libturbojpeg: whole-image decoding, the same outputs
    monkeypatch.setattr(region_decode, "decoder", lambda: None)
    transform.set_random_seed(3)
    expected = transform(image=read_rgb(paths["exif6.jpg"], shrink))["image"]
    transform.set_random_seed(3)
    assert torch.equal(crop_first.finish(crop_first.read(paths["exif6.jpg"], shrink)), expected)


def test_exif_orientation_from_the_header_and_as_shown_match_pil(tmp_path):
    for name, path in _image_files(tmp_path).items():
        if not name.startswith("exif"):
            continue
        with Image.open(path) as image:
            assert jpeg_header(open(path, "rb").read()).orientation == image.getexif().get(0x0112, 1), name
            shown = np.array(ImageOps.exif_transpose(image).convert("RGB"))
        np.testing.assert_array_equal(read_rgb(path), shown, err_msg=name)


def test_big_endian_exif_orientation_is_read():
    data = bytearray(_jpeg(np.zeros((16, 24, 3), np.uint8)))
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00" + b"\x00" * 4
    segment = b"Exif\x00\x00" + tiff
    data[2:2] = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    header = jpeg_header(bytes(data))
    assert (header.width, header.height, header.orientation, header.turned) == (24, 16, 8, True)
    shown = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR_RGB)
    assert shown.shape == (24, 16, 3)  # OpenCV turns it as well


def test_a_damaged_jpeg_goes_to_the_full_decoder_and_fails_as_it_does(tmp_path):
    data = _jpeg(_photo(np.random.default_rng(1), 200, 150))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # libjpeg-turbo warns: premature end
    assert region_decode.decoder().decode(data[: len(data) // 2], (0, 100, 64, 140)) is None
    crop_first = CropFirst(train_transform(64, MEAN, STD, (0.25, 1.0), normalize=False))
    for read in (read_rgb, crop_first.read):  # one error, naming the file (bad_images.py skips it)
        with pytest.raises(OSError, match="cut.jpg: OpenCV could not decode this JPEG"):
            read(tmp_path / "cut.jpg")


def test_training_data_runs_crop_first_and_evaluation_does_not(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(6):
            orientation = (1, 6, 3)[i % 3]
            (tmp_path / label / f"{i}.jpg").write_bytes(_jpeg(_photo(rng, 97 + 9 * i, 75 + 5 * i), orientation=orientation))
    dm = ImageFolderDataModule(str(tmp_path), backbone="resnet18", image_size=48, val_fraction=0.25, num_workers=0)
    dataset = dm.train_dataloader().dataset
    assert dataset.crop_first is not None
    assert dm.val_dataloader().dataset.crop_first is None  # resize + centre crop: the whole image
    reference = ImageDataset(dataset.items, dataset.transform, dataset.seed, dataset.shrink, crop_first=False)
    regions = []
    real_decode = region_decode.RegionDecoder.decode
    monkeypatch.setattr(region_decode.RegionDecoder, "decode", lambda self, *a: regions.append(1) or real_decode(self, *a))
    # the same (index, epoch) key: the same augmented image whichever path decodes it
    keys = [(index, epoch) for epoch in range(3) for index in range(len(dataset))]
    for key in keys:
        assert torch.equal(dataset[key]["image"], reference[key]["image"]), key
    assert len(regions) == len(keys)
