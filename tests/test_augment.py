"""Augmentation policies, random erasing and the crop policy of ImageFolderDataModule: each a
function of (seed, epoch, index) alone, crop first unchanged, evaluation and export alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.augment import mean_fill
from finetune.data.classification import ImageDataset, ImageFolderDataModule
from finetune.data.screening import screening
from finetune.export.runtime import Preprocess
from finetune.preprocessing import Preprocessing

POLICIES = ("randaugment", "trivialaugment", "autoaugment")


def _textured(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 1, width)[None, :, None]
    image = rng.uniform(40, 200, 3) * (0.5 + x) + rng.normal(0, 15, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """2 classes x 4 textured JPEGs, wider than tall: crop first decodes their regions."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(4):
            Image.fromarray(_textured(rng, 90 + 7 * i, 60)).save(root / label / f"{i}.jpg", quality=90)
    return root


def _module(root, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), backbone="resnet18", image_size=32, val_fraction=0.0, num_workers=0,
                                 batch_size=4, **kwargs)


def _train(root, **kwargs) -> ImageDataset:
    dm = _module(root, **kwargs)
    return dm.dataset(dm.splits.train, train=True)


@pytest.mark.parametrize("augment", POLICIES)
def test_a_policy_changes_images_after_the_same_crop_and_keeps_labels(jpeg_folder, augment):
    light, policy = _train(jpeg_folder), _train(jpeg_folder, augment=augment)
    changed = 0
    for index in range(len(light)):
        plain, augmented = light[(index, 0)], policy[(index, 0)]
        assert augmented["label"] == plain["label"] and augmented["path"] == plain["path"]
        assert augmented["image"].dtype == torch.uint8 and augmented["image"].shape == (3, 32, 32)
        changed += not torch.equal(augmented["image"], plain["image"])
    assert changed >= len(light) // 2, f"{augment} changed {changed} of {len(light)} images"


def test_augmentation_is_a_function_of_seed_epoch_and_index(jpeg_folder):
    dm = _module(jpeg_folder, augment="randaugment", random_erasing=0.5)
    dataset = dm.dataset(dm.splits.train, train=True)
    first = [dataset[(i, 1)]["image"] for i in range(len(dataset))]
    assert all(torch.equal(a, dataset[(i, 1)]["image"]) for i, a in enumerate(first))  # twice, same
    assert sum(not torch.equal(a, dataset[(i, 2)]["image"]) for i, a in enumerate(first)) >= len(first) - 1
    loader = dm.train_dataloader()  # num_workers 0, shuffled: each batch names its indices
    loader.sampler.set_epoch(1)
    for batch in loader:
        for image, index in zip(batch["image"], batch["index"].tolist()):
            assert torch.equal(image, first[index]), index


def test_loading_a_training_sample_leaves_torchs_generator_alone(jpeg_folder):
    dataset = _train(jpeg_folder, augment="trivialaugment", random_erasing=1.0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    dataset[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)


def test_random_erasing_fills_a_box_with_the_mean_colour(tmp_path):
    for label, colour in (("a", (10, 200, 30)), ("b", (250, 20, 90))):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(tmp_path / label / "0.png")
    dm = _module(tmp_path, random_erasing=1.0)
    plain, erased = _train(tmp_path), dm.dataset(dm.splits.train, train=True)
    fill = torch.tensor(mean_fill(dm.mean), dtype=torch.uint8)  # 0 once normalised
    for index in range(len(plain)):
        before, after = plain[(index, 0)]["image"], erased[(index, 0)]["image"]
        box = (before != after).any(0)
        rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
        assert box.sum() > 0 and box.sum() == len(rows) * len(cols)  # one filled rectangle
        assert (after[:, box] == fill[:, None]).all()


def _marked(path, width: int = 96, height: int = 48) -> None:
    """Grey, with a red block at the middle of the left border."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[height // 2 - 3: height // 2 + 3, :4] = (255, 0, 0)
    Image.fromarray(pixels).save(path)


def _has_red(image: torch.Tensor) -> bool:
    return bool(((image[0] > 200) & (image[1] < 60)).any())


def test_crop_whole_keeps_the_border_in_evaluation_and_export(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        _marked(tmp_path / label / "0.png")
    cropped, whole = _module(tmp_path), _module(tmp_path, crop="whole")
    path = cropped.splits.train[0][0]
    assert not _has_red(cropped.dataset(cropped.splits.train, train=False)[0]["image"])  # the centre crop cuts it
    image = whole.dataset(whole.splits.train, train=False)[0]["image"]
    assert image.shape == (3, 32, 32) and _has_red(image[:, :, :2])
    assert all(_has_red(whole.dataset(whole.splits.train, train=True)[(0, e)]["image"]) for e in range(4))
    # what the checkpoint and the exported file carry evaluates the same way
    meta = whole.preprocessing_config
    assert meta["resize_mode"] == "squash" and Preprocessing.from_dict(meta) == whole.preprocessing
    exported = Preprocess(meta)(path)
    assert torch.equal(torch.from_numpy(exported).permute(2, 0, 1), image)
    old = {k: v for k, v in cropped.preprocessing_config.items() if k != "resize_mode"}  # files from before
    assert Preprocessing.from_dict(old).resize_mode == "crop"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("random_erasing", 1.5, "data.random_erasing: 1.5 is out of range"),
    ("augment_ops", 0, "data.augment_ops: 0 is out of range"),
    ("augment_magnitude", 31, "data.augment_magnitude: 31 is out of range"),
    ("augment", "randomaugment", "data.augment: 'randomaugment' is not one of light, randaugment"),
    ("crop", "centre", "data.crop: 'centre' is not one of random_resized, whole"),
])
def test_bad_values_are_one_line_errors_naming_the_key(jpeg_folder, key, value, message):
    with pytest.raises(ValueError, match=message) as error:
        _module(jpeg_folder, **{key: value})
    assert "\n" not in str(error.value)


def test_crop_first_runs_with_a_policy_and_gives_the_whole_decodes_output(jpeg_folder):
    dataset = _train(jpeg_folder, augment="autoaugment", random_erasing=0.5)
    assert dataset.crop_first is not None
    reference = ImageDataset(dataset.items, dataset.transform, dataset.seed, dataset.shrink, crop_first=False)
    for key in [(index, epoch) for epoch in range(2) for index in range(len(dataset))]:
        assert torch.equal(dataset[key]["image"], reference[key]["image"]), key


def test_check_data_suggests_the_whole_image_for_wide_photos(jpeg_folder):
    with screening("full"):
        report = _module(jpeg_folder).report
        whole = _module(jpeg_folder, crop="whole").report
    crop = report.crop
    assert crop["far_from_square"] == 8 and crop["suggest"] == "--data.crop whole"
    assert crop["long_side_dropped"] == round(1 - crop["crop_pct"] / (111 / 60), 3)
    assert whole.crop["suggest"] is None
