"""Shuffle order and augmentation that depend on (seed, epoch, index) alone.

So a resumed run sees the epochs it missed in the order, and with the augmentations, it
would have; and N ranks of batch B step through the same global batches as 1 process of
batch N*B, whatever worker loads an image.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DistributedSampler, WeightedRandomSampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch), for any number of ranks) that hands the
    epoch to the dataset with each index: `(index, epoch)`. Lightning calls set_epoch() on it
    and leaves a DistributedSampler it is given in place.

    `resume_at(epoch, skip)`: a run resumed from a checkpoint taken `skip` samples (per rank)
    into `epoch` starts that epoch where the checkpoint left it. Lightning 2.6 restores its
    batch counter but restarts a plain DataLoader's order from the top.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_epoch, self.resume_skip = -1, 0

    def resume_at(self, epoch: int, skip: int) -> None:
        # set_epoch now, not only when Lightning calls it: with workers, the first epoch's
        # iterator (and its order) is created before Lightning sets the epoch.
        self.set_epoch(epoch)
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self):
        epoch = self.epoch
        indices = self.rank_indices()
        if epoch == self.resume_epoch:
            indices = indices[self.resume_skip:]
        return iter([(index, epoch) for index in indices])

    def rank_indices(self) -> list[int]:
        """This rank's share of the epoch's order, before any resume skip."""
        return list(super().__iter__())


RARE_CLASS = 5  # fewer train images than this: reported as repeated by BalancedSampler


class BalancedSampler(EpochShuffleSampler):
    """EpochShuffleSampler whose epoch draws `len(dataset)` indices with replacement, every
    class equally often in expectation (WeightedRandomSampler, weights 1 / class count).

    The global draw is f(seed, epoch); DistributedSampler (shuffle off) then pads and shards its
    positions across ranks as it would a permutation, so `(index, epoch)` pairs, `resume_at` and
    N ranks of batch B = 1 process of batch N*B hold as for EpochShuffleSampler.

    A class with few images is drawn as often as any other, i.e. its images repeat within an
    epoch (one INFO line says how many such classes there are); a class with none (`num_classes`
    beyond the labels) gets weight 0, is never drawn, and is warned about.
    """

    def __init__(self, dataset, labels: list[int], num_classes: int | None = None, **kwargs):
        if len(labels) != len(dataset):
            raise ValueError(f"BalancedSampler: {len(labels)} labels for {len(dataset)} samples")
        kwargs["shuffle"] = False  # positions 0..n-1 of the draw, padded and sharded in order
        super().__init__(dataset, **kwargs)
        labels = torch.as_tensor(labels, dtype=torch.long)
        counts = torch.bincount(labels, minlength=num_classes or 0)
        self.class_counts = counts.tolist()
        self.weights = (1.0 / counts.clamp(min=1).double())[labels]  # each class sums to 1
        if self.rank == 0:
            self._report(self.class_counts)

    @staticmethod
    def _report(counts: list[int]) -> None:
        empty = [label for label, n in enumerate(counts) if n == 0]
        rare = [n for n in counts if 0 < n < RARE_CLASS]
        if empty:
            log.warning("Balanced sampling: class(es) %s have no training images and are never drawn", empty)
        if rare:
            drawn = sum(counts) / (len(counts) - len(empty))
            log.info(
                "Balanced sampling: %d of %d classes have fewer than %d training images; each class is drawn "
                "~%.0f times an epoch, so their images are repeated", len(rare), len(counts), RARE_CLASS, drawn,
            )

    def rank_indices(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)  # as DistributedSampler seeds its permutation
        drawn = list(WeightedRandomSampler(self.weights, len(self.weights), replacement=True, generator=generator))
        return [drawn[position] for position in super().rank_indices()]


def seeded_index(transform, seed: int, key: int | tuple[int, int]) -> int:
    """The sample index; with an `(index, epoch)` key, seed the augmentation by (seed, epoch, index)."""
    if isinstance(key, tuple):
        index, epoch = key
        numpy_generator, python_random = _generators(transform)
        mixed = _mix(seed, epoch, index)
        python_random.seed(mixed)
        numpy_generator.bit_generator.state = {
            "bit_generator": "PCG64", "state": {"state": _mix(mixed, 1), "inc": _PCG_STREAM}, "has_uint32": 0, "uinteger": 0,
        }
        return index
    return key


# Reseeding one persistent pair in place costs ~6 us an image; a new pair per image (default_rng
# from a SeedSequence, random.Random) cost ~17 us plus slower transforms after it, and
# albumentations' set_random_seed, a pair per transform, ~90 us: up to a tenth of decoding a photo.
_PCG_STREAM = 0xDA3E39CB94B95BDB  # PCG64's increment (odd); the state carries the seed
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 folded over `values`: nearby (seed, epoch, index) give unrelated 64-bit seeds."""
    z = 0
    for value in values:
        z = (z + value * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


def _generators(transform) -> tuple[np.random.Generator, random.Random]:
    """The numpy and Python generators every part of `transform` draws from: one pair per
    transform and process (each DataLoader worker holds its own copy), installed once."""
    pair = getattr(transform, "_finetune_generators", None)
    if pair is None or transform.py_random is not pair[1]:  # new, or someone else set a state since
        pair = (np.random.Generator(np.random.PCG64()), random.Random())
        transform.set_random_state(*pair)
        transform._finetune_generators = pair
    return pair


MAX_WORKERS = 8


def default_num_workers(trainer=None) -> int:
    """DataLoader workers for this process: its share of the CPUs it may use, 1 to 8.

    Every process (one per GPU) starts its own workers: 8 each from 8 processes on a 16-core
    node would thrash. SLURM gives each task its own CPUs (`srun` with one task per GPU, as
    Lightning runs under SLURM); torchrun's processes share the CPUs of the task that started
    them.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm_cpus and "LOCAL_WORLD_SIZE" not in os.environ:
        share = min(cpus, int(slurm_cpus))
        why = f"{share} CPUs for this SLURM task"
    else:
        cpus = min(cpus, int(slurm_cpus)) if slurm_cpus else cpus
        processes = local_processes(trainer)
        share = cpus // processes
        why = f"{cpus} CPUs / {processes} process{'es' if processes > 1 else ''} on this node"
    workers = max(1, min(MAX_WORKERS, share))
    _log_once(f"{workers} DataLoader workers per process: {why}")
    return workers


def local_processes(trainer) -> int:
    """Training processes on this node: torchrun says; else Lightning's, one per device."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if trainer is not None and trainer.world_size > 1:
        return trainer.num_devices
    return 1


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def train_sampler(datamodule, dataset) -> EpochShuffleSampler:
    """`data.sampler`: "shuffle" (EpochShuffleSampler) or "balanced" (BalancedSampler, by the
    DataModule's `train_labels()`); DataModules without the setting shuffle."""
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    settings = dict(num_replicas=world, rank=rank, seed=datamodule.hparams.seed)
    if getattr(datamodule.hparams, "sampler", "shuffle") == "balanced":
        labels = balanced_labels(datamodule)
        sampler = BalancedSampler(dataset, labels, num_classes=getattr(datamodule, "num_classes", None), **settings)
    else:
        sampler = EpochShuffleSampler(dataset, shuffle=True, **settings)
    position = datamodule.take_resume_position()  # restored from the checkpoint: finetune.data.resume
    if position is not None:
        epoch, batches = position
        sampler.resume_at(epoch, batches * datamodule.hparams.batch_size)
        if batches:
            log.info("Resuming epoch %d after its first %d batches: they are skipped, not repeated", epoch, batches)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    return sampler


def balanced_labels(datamodule) -> list[int]:
    """The train labels `sampler: balanced` draws by; a one-line error where there are none."""
    if not hasattr(datamodule, "train_labels"):
        raise ValueError(f"data.sampler: balanced needs one class label per image; {type(datamodule).__name__} has none")
    return datamodule.train_labels()
