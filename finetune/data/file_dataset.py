"""The Dataset every folder DataModule loads through: one item of files per index."""

from __future__ import annotations

from torch.utils.data import Dataset

from finetune.data.bad_images import load_or_replace
from finetune.data.sampling import seeded_index


class FileDataset(Dataset):
    """`items[index]` read by `_load` (a subclass's) into a dict.

    Indexed by `(index, epoch)` (from EpochShuffleSampler), random augmentation is seeded by
    (seed, epoch, index): the same image gets the same crop in a resumed or a DDP run,
    whatever the worker that loads it. A plain index (evaluation, predict) seeds nothing.
    """

    def __init__(self, items: list, transform, seed: int = 0):
        self.items = items
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = seeded_index(self.transform, self.seed, key)
        # A file that fails here takes the next one's place; the batch names it (bad_images.py).
        return load_or_replace(self._load, index, len(self.items))

    def _load(self, index: int) -> dict:
        raise NotImplementedError
