"""Segmentation folders as users have them: both layouts, class lists, mask formats, clear errors,
joint image+mask augmentation and padded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.segmentation import SegmentationFolderDataModule
from finetune.data.segmentation_classes import default_palette
from finetune.data.segmentation_folder import read_mask, scan_segmentation_folder

CLASSES = ["background", "cat", "dog"]
H, W = 40, 56


def stripes(height: int, width: int, seed: int) -> np.ndarray:
    """Vertical bands of classes 0, 1, 2 (offset per image) and an ignore (255) border on top."""
    mask = ((np.arange(width)[None, :] // 7 + seed) % 3).repeat(height, axis=0).astype(np.uint8)
    mask[:3] = 255
    return mask


def write_pair(folder: Path, stem: str, seed: int = 0, size: tuple[int, int] = (H, W), mask_mode: str = "L") -> np.ndarray:
    """folder/images/<stem>.png and folder/masks/<stem>.png; returns the mask's class indices."""
    height, width = size
    rng = np.random.default_rng(seed)
    (folder / "images" / stem).parent.mkdir(parents=True, exist_ok=True)
    (folder / "masks" / stem).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / "images" / f"{stem}.png")
    mask = stripes(height, width, seed)
    image = Image.fromarray(mask)
    if mask_mode == "P":
        image = image.convert("P")  # palette of grey levels: index i shows as grey i
        image.putpalette([c for rgb in default_palette(256) for c in rgb])  # colours unlike the indices
    image.save(folder / "masks" / f"{stem}.png")
    return mask


def write_flat(root: Path, n: int = 10) -> Path:
    for i in range(n):
        write_pair(root, f"img_{i:02d}", seed=i)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def datamodule(root: Path, **kwargs) -> SegmentationFolderDataModule:
    kwargs = {"backbone": "resnet18", "num_workers": 0, "crop_size": 32, "batch_size": 2, **kwargs}
    return SegmentationFolderDataModule(str(root), **kwargs)


def one_line_error(excinfo, *names) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)
    return message


# --- layouts and classes ---------------------------------------------------------------------

def test_flat_layout_is_split_deterministically(tmp_path):
    write_flat(tmp_path, 10)
    write_pair(tmp_path, "sub/nested", seed=3)  # masks/sub/nested.png matches images/sub/nested.png
    splits = scan_segmentation_folder(tmp_path, val_fraction=0.2, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 2, 0)
    assert not set(splits.train) & set(splits.val)
    every = splits.train + splits.val
    assert all(Path(m).stem == Path(i).stem and "/masks/" in m for i, m in every)
    assert str(tmp_path / "masks" / "sub" / "nested.png") in {m for _, m in every}
    assert scan_segmentation_folder(tmp_path, 0.2, seed=3) == splits
    assert scan_segmentation_folder(tmp_path, 0.2, seed=4).val != splits.val
    dm = datamodule(tmp_path, val_fraction=0.2, seed=3)
    assert dm.splits == splits and dm.num_classes == 3 and dm.class_names == CLASSES


def test_train_val_test_layout_and_class_colours_from_yaml(tmp_path):
    for i in range(4):
        write_pair(tmp_path / "train", f"t{i}", seed=i)
    write_pair(tmp_path / "val", "v0", seed=5)
    write_pair(tmp_path / "test", "s0", seed=6)
    (tmp_path / "classes.yaml").write_text(
        "- {name: background, color: [0, 0, 0]}\n- {name: cat, color: [255, 0, 0]}\n- name: dog\n"
    )
    dm = datamodule(tmp_path, val_fraction=0.5)
    assert [len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)] == [4, 1, 1]  # val/ exists: no split
    assert dm.class_names == CLASSES
    assert dm.class_colors == [(0, 0, 0), (255, 0, 0), default_palette(3)[2]]
    assert next(iter(dm.test_dataloader()))["path"] == [str(tmp_path / "test" / "images" / "s0.png")]


def test_train_only_layout_is_split_and_missing_test_split_is_an_error(tmp_path):
    for i in range(5):
        write_pair(tmp_path / "train", f"t{i}", seed=i)
    dm = datamodule(tmp_path, class_names=CLASSES, val_fraction=0.4)
    assert (len(dm.splits.train), len(dm.splits.val)) == (3, 2)
    with pytest.raises(ValueError, match="no test/ split") as excinfo:
        dm.test_dataloader()
    one_line_error(excinfo, tmp_path)


@pytest.mark.parametrize(
    "filename, text",
    [
        ("classes.yaml", "[background, cat, dog]\n"),
        ("classes.yaml", "0: background\n1: cat\n2: dog\n"),
        ("classes.yaml", "2: dog\n0: background\n1: cat\n"),  # mapping order does not matter
        ("classes.txt", "background\ncat\n\ndog\n"),
    ],
)
def test_class_names_from_files(tmp_path, filename, text):
    write_flat(tmp_path, 3)
    (tmp_path / "classes.txt").unlink()
    (tmp_path / filename).write_text(text)
    dm = datamodule(tmp_path)
    assert dm.class_names == CLASSES and dm.num_classes == 3
    palette = dm.class_colors
    assert palette == default_palette(3) and len(set(palette)) == 3 and palette[0] == (0, 0, 0)


def test_class_names_argument_wins_and_a_missing_list_is_an_error(tmp_path):
    write_flat(tmp_path, 3)
    dm = datamodule(tmp_path, class_names=["bg", "a", "b", "c"])
    assert dm.class_names == ["bg", "a", "b", "c"] and dm.num_classes == 4
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ValueError) as excinfo:
        datamodule(tmp_path)
    one_line_error(excinfo, "data.root", tmp_path, "classes.yaml", "classes.txt", "data.class_names")
    (tmp_path / "classes.yaml").write_text("0: background\n2: dog\n")
    with pytest.raises(ValueError, match=r"missing \[1\]") as excinfo:
        datamodule(tmp_path)
    one_line_error(excinfo, tmp_path / "classes.yaml")


def test_ignore_index_that_is_a_class_is_an_error(tmp_path):
    write_flat(tmp_path, 3)
    with pytest.raises(ValueError) as excinfo:
        datamodule(tmp_path, ignore_index=2)
    one_line_error(excinfo, "data.ignore_index", "255")


# --- masks and errors ------------------------------------------------------------------------

def test_palette_masks_are_read_as_indices(tmp_path):
    expected = write_pair(tmp_path, "p", seed=1, mask_mode="P")
    write_pair(tmp_path, "q", seed=2)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    mask_path = tmp_path / "masks" / "p.png"
    assert Image.open(mask_path).mode == "P"
    assert np.array_equal(read_mask(mask_path, 3, 255), expected)
    dm = datamodule(tmp_path, val_fraction=0.5, seed=0, pad_multiple=1)
    dm.splits.val = [(str(tmp_path / "images" / "p.png"), str(mask_path))]
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].dtype == torch.uint8  # widened to int64 on the device (test_device_batches.py)
    assert np.array_equal(batch["mask"][0].numpy(), expected)


def test_missing_root_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        datamodule(tmp_path / "nowhere", class_names=CLASSES)
    one_line_error(excinfo, "data.root", tmp_path / "nowhere")


def test_image_without_mask_names_the_expected_mask(tmp_path):
    write_flat(tmp_path, 3)
    (tmp_path / "masks" / "img_01.png").unlink()
    with pytest.raises(ValueError) as excinfo:
        datamodule(tmp_path, on_bad_image="raise")  # the default skips the pair (test_bad_images.py)
    one_line_error(excinfo, tmp_path / "images" / "img_01.png", tmp_path / "masks" / "img_01.png")
    Image.new("L", (W, H)).save(tmp_path / "masks" / "img_01.jpg")
    with pytest.raises(ValueError, match="found img_01.jpg: masks must be PNG"):
        datamodule(tmp_path, on_bad_image="raise")


def test_size_mismatch_is_found_at_construction(tmp_path):
    write_flat(tmp_path, 3)
    Image.new("L", (W + 1, H)).save(tmp_path / "masks" / "img_02.png")
    with pytest.raises(ValueError, match=f"mask is {W + 1}x{H} .* is {W}x{H}") as excinfo:
        datamodule(tmp_path, on_bad_image="raise")
    one_line_error(excinfo, tmp_path / "masks" / "img_02.png", tmp_path / "images" / "img_02.png")


def test_rgb_mask_is_found_at_construction(tmp_path):
    write_flat(tmp_path, 3)
    Image.new("RGB", (W, H), (255, 0, 0)).save(tmp_path / "masks" / "img_00.png")
    with pytest.raises(ValueError, match="mask is a RGB image") as excinfo:
        datamodule(tmp_path, on_bad_image="raise")
    one_line_error(excinfo, tmp_path / "masks" / "img_00.png", "'L'", "'P'")


def test_out_of_range_label_is_an_error_when_the_mask_is_loaded(tmp_path):
    write_flat(tmp_path, 2)
    mask = stripes(H, W, 0)
    mask[10:12, 10:12] = 7
    mask[20, 20] = 3
    Image.fromarray(mask).save(tmp_path / "masks" / "img_01.png")
    dm = datamodule(tmp_path, val_fraction=0.5, seed=0)  # the label range is read with the pixels
    bad = tmp_path / "masks" / "img_01.png"
    dm.splits.val = [(str(tmp_path / "images" / "img_01.png"), str(bad))]
    with pytest.raises(ValueError, match=r"mask values \[3, 7\]") as excinfo:
        next(iter(dm.val_dataloader()))
    one_line_error(excinfo, bad, "ignore_index 255")


# --- transforms and batches ------------------------------------------------------------------

def test_training_crop_pads_small_images_with_ignore_index(tmp_path):
    write_flat(tmp_path, 4)
    dm = datamodule(tmp_path, crop_size=64, scale=(1.0, 1.0), color_jitter=0.0, val_fraction=0.0, batch_size=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 64, 64)
    assert batch["mask"].dtype == torch.uint8
    for mask in batch["mask"]:
        # scale 1: the whole 40x56 mask survives (its 3 top rows are 255 already), the rest is padding
        labelled = (mask != 255).sum().item()
        assert labelled == (H - 3) * W
        assert (mask[0] == 255).all() and (mask[-1] == 255).all()
        assert set(mask.unique().tolist()) == {0, 1, 2, 255}
    # image padding is the mean colour, 0 after normalisation (to uint8 rounding), as in val batches;
    # workers ship uint8 and the DataModule normalises after the transfer to the device
    assert batch["image"].dtype == torch.uint8
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["image"][0, :, 0].abs().max() < 0.02 and batch["image"][0, :, 32].abs().max() > 0.5


def test_augmented_masks_keep_only_labels_and_ignore_index(tmp_path):
    write_flat(tmp_path, 3)
    dm = datamodule(tmp_path, crop_size=48, scale=(0.5, 2.0), color_jitter=0.4, val_fraction=0.0)
    dataset = dm.train_dataloader().dataset
    seen = set()
    for epoch in range(8):
        for index in range(len(dataset)):
            item = dataset[(index, epoch)]
            assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.uint8  # normalised on the device
            seen |= set(item["mask"].unique().tolist())
    # A linear resize would blend 0|2 and 0|255 edges into values such as 1 or 127.
    assert seen == {0, 1, 2, 255}


def test_same_index_and_epoch_give_the_same_sample(tmp_path):
    write_flat(tmp_path, 4)
    dm = datamodule(tmp_path, crop_size=32, val_fraction=0.0)
    dataset = dm.train_dataloader().dataset
    a, b, c = dataset[(1, 5)], dataset[(1, 5)], dataset[(1, 6)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    # the train sampler hands (index, epoch) keys: a fresh loader repeats an epoch exactly
    first = []
    for _ in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        first.append(next(iter(loader)))
    assert first[0]["path"] == first[1]["path"] and torch.equal(first[0]["image"], first[1]["image"])


def test_val_batches_of_different_sizes_are_padded_to_the_multiple(tmp_path):
    write_pair(tmp_path / "train", "t0", seed=0)
    a = write_pair(tmp_path / "val", "a", seed=1, size=(40, 56))
    b = write_pair(tmp_path / "val", "b", seed=2, size=(50, 33))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    dm = datamodule(tmp_path, pad_multiple=32, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 64, 64)
    assert np.array_equal(batch["mask"][0, :40, :56].numpy(), a)
    assert np.array_equal(batch["mask"][1, :50, :33].numpy(), b)
    assert (batch["mask"][0, 40:] == 255).all() and (batch["mask"][0, :, 56:] == 255).all()
    assert (batch["mask"][1, 50:] == 255).all() and (batch["mask"][1, :, 33:] == 255).all()
    # image padding is the mean colour: about 0 once normalised on the device
    image = dm.on_after_batch_transfer(batch, 0)["image"]
    assert image[1, :, :, 33:].abs().max() < 0.01 and image[1, :, :, :33].abs().max() > 0.1


def test_predict_items_keep_their_original_size(tmp_path):
    write_flat(tmp_path, 2)
    predict = tmp_path / "predict"
    (predict / "sub").mkdir(parents=True)
    Image.new("RGB", (56, 40), (10, 20, 30)).save(predict / "x.png")
    Image.new("RGB", (20, 70), (10, 20, 30)).save(predict / "sub" / "y.jpg")
    dm = datamodule(tmp_path, predict_root=str(predict), pad_multiple=16, batch_size=4)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["path"] == [str(predict / "sub" / "y.jpg"), str(predict / "x.png")]
    assert batch["size"] == [(70, 20), (40, 56)]
    assert batch["image"].shape == (2, 3, 80, 64) and "mask" not in batch
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="data.predict_root: no images under"):
        datamodule(tmp_path, predict_root=str(empty)).predict_dataloader()
