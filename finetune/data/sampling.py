"""Shuffle order and augmentation that depend on (seed, epoch, index) alone.

So a resumed run sees the epochs it missed in the order, and with the augmentations, it
would have; and N ranks of batch B step through the same global batches as 1 process of
batch N*B, whatever worker loads an image.
"""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch), for any number of ranks) that hands the
    epoch to the dataset with each index: `(index, epoch)`. Lightning calls set_epoch() on it
    and leaves a DistributedSampler it is given in place."""

    def __iter__(self):
        return ((index, self.epoch) for index in super().__iter__())


def seeded_index(transform, seed: int, key: int | tuple[int, int]) -> int:
    """The sample index; with an `(index, epoch)` key, seed the augmentation by (seed, epoch, index)."""
    if isinstance(key, tuple):
        index, epoch = key
        transform.set_random_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]))
        return index
    return key


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


def train_sampler(datamodule, dataset) -> EpochShuffleSampler:
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return EpochShuffleSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=datamodule.hparams.seed)
