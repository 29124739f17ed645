"""Image folders as users have them: both layouts, every image mode, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_colour_images
from PIL import Image

from finetune.data import ImageFolderDataModule
from finetune.data.folder import scan_image_folder
from finetune.data.images import read_rgb


def test_flat_layout_is_split_per_class(tmp_path):
    write_colour_images(tmp_path, per_class=10, seed=0)
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    splits = scan_image_folder(tmp_path, val_fraction=0.2, seed=3)
    assert splits.class_names == ["blue", "green", "red"]
    assert len(splits.train) == 24 and len(splits.val) == 6
    assert sorted(label for _, label in splits.val) == [0, 0, 1, 1, 2, 2]  # stratified
    assert not {p for p, _ in splits.train} & {p for p, _ in splits.val}
    assert scan_image_folder(tmp_path, 0.2, seed=3).val == splits.val  # same seed, same split
    assert scan_image_folder(tmp_path, 0.2, seed=4).val != splits.val


def test_train_val_test_layout(colour_folder, tmp_path):
    splits = scan_image_folder(colour_folder)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 24, 0)
    write_colour_images(tmp_path / "train", 4, seed=0)
    (tmp_path / "train" / "purple").mkdir()
    with pytest.raises(ValueError, match=r"\['purple'\] .* no training images"):
        scan_image_folder(tmp_path)


def test_val_class_missing_from_train_is_an_error(tmp_path):
    write_colour_images(tmp_path / "train", 2, seed=0)
    write_colour_images(tmp_path / "val", 2, seed=0)
    (tmp_path / "val" / "cyan").mkdir()
    with pytest.raises(ValueError, match="cyan is a class the train split does not have"):
        scan_image_folder(tmp_path)


def test_missing_root_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root: .*nowhere is not a folder"):
        scan_image_folder(tmp_path / "nowhere")


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_every_image_mode_becomes_rgb(tmp_path):
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    grey = Image.fromarray(gradient)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    sixteen = Image.fromarray(gradient.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    files = {
        "grey.png": _save(grey, tmp_path / "grey.png"),
        "palette.bmp": _save(grey.convert("P"), tmp_path / "palette.bmp"),
        "cmyk.tif": _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.tif"),
        "rgba.webp": _save(rgba, tmp_path / "rgba.webp", lossless=True),
        "16bit.png": _save(sixteen, tmp_path / "16bit.png"),
        "photo.jpeg": _save(Image.new("RGB", (8, 8), (0, 0, 255)), tmp_path / "photo.jpeg"),
    }
    arrays = {name: read_rgb(path) for name, path in files.items()}
    for name, array in arrays.items():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
    assert (arrays["rgba.webp"] == 255).all()  # transparent composites onto white
    assert arrays["cmyk.tif"][0, 0].tolist() == [255, 0, 0]
    # 16-bit values scale to 8 bits instead of clipping at 255
    np.testing.assert_allclose(arrays["16bit.png"][..., 0], gradient, atol=1)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    array = read_rgb(tmp_path / "phone.jpg")
    assert array.shape[:2] == (20, 10)
    assert array[2, 5].mean() > 200 and array[-3, 5].mean() < 50  # white half is now on top


def test_datamodule_uses_backbone_preprocessing_unless_overridden(colour_folder):
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet50.tv2_in1k", num_workers=0)
    assert (dm.image_size, dm.crop_pct, dm.interpolation) == (176, 0.875, "bilinear")
    assert dm.num_classes == 3 and dm.class_names == ["blue", "green", "red"]
    dm = ImageFolderDataModule(
        str(colour_folder), backbone="resnet18", image_size=32, mean=(0.5,) * 3, batch_size=16, num_workers=0
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.229, 0.224, 0.225)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == (32, 32) and val["label"].tolist()[:2] == [0, 0]


def test_predict_folder_and_missing_test_split(colour_folder):
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", num_workers=0, predict_root=str(colour_folder / "val"))
    paths = [p for batch in dm.predict_dataloader() for p in batch["path"]]
    assert len(paths) == 24
    with pytest.raises(ValueError, match="no test/ split"):
        dm.test_dataloader()
