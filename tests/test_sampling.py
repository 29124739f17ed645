"""Augmentation seeded by (seed, epoch, index): what exact resume and DDP rely on."""

from __future__ import annotations

import pickle

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2

from finetune.data.sampling import seeded_index
from finetune.data.transforms import train_transform

IMAGE = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def augmented(transform, key, seed: int = 0) -> np.ndarray:
    seeded_index(transform, seed, key)
    return transform(image=IMAGE)["image"].numpy()


def test_same_key_same_augmentation_whatever_came_before_and_in_another_process():
    transform = train_transform(64, MEAN, STD, (0.1, 1.0), 0.5, normalize=False)
    first = augmented(transform, (7, 2))
    for other in range(20):  # draws for other images in between, as a worker does
        augmented(transform, (other, 2))
    np.testing.assert_array_equal(augmented(transform, (7, 2)), first)
    worker_copy = pickle.loads(pickle.dumps(transform))  # what a DataLoader worker holds
    np.testing.assert_array_equal(augmented(worker_copy, (7, 2)), first)
    transform.set_random_seed(123)  # someone resets the transform's generators: seeding still rules
    np.testing.assert_array_equal(augmented(transform, (7, 2)), first)


def test_index_epoch_and_seed_each_change_the_augmentation():
    transform = train_transform(64, MEAN, STD, (0.1, 1.0), 0.5, normalize=False)
    reference = augmented(transform, (7, 2))
    for key, seed in (((8, 2), 0), ((7, 3), 0), ((7, 2), 1), ((2, 7), 0)):
        assert not np.array_equal(augmented(transform, key, seed), reference), (key, seed)
    # Over many images the flip is a fair coin: the streams of nearby keys are not correlated.
    flip = A.Compose([A.HorizontalFlip(p=0.5), ToTensorV2()])
    mirrored = IMAGE[:, ::-1].transpose(2, 0, 1)
    flips = [np.array_equal(augmented(flip, (i, 0)), mirrored) for i in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_plain_index_is_returned_untouched():
    transform = train_transform(64, MEAN, STD, (0.1, 1.0), 0.5, normalize=False)
    assert seeded_index(transform, 0, 5) == 5 and seeded_index(transform, 0, (5, 1)) == 5
