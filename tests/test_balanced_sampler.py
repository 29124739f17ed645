"""`sampler: balanced`: every class drawn equally often, in an order that is f(seed, epoch),
sharded across ranks and resumable exactly like the shuffled order."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DistributedSampler

from finetune.data import ImageFolderDataModule, SegmentationFolderDataModule
from finetune.data.loader import data_loader
from finetune.data.sampling import BalancedSampler, EpochShuffleSampler, train_sampler
from finetune.data.splits import Splits

LABELS = [0] * 10 + [1] * 100  # 1:10


class Items:
    """What the sampler sees of a dataset: its length."""

    def __init__(self, labels):
        self.items = [(f"{i}.png", label) for i, label in enumerate(labels)]

    def __len__(self):
        return len(self.items)


def sampler(labels=LABELS, **kwargs) -> BalancedSampler:
    kwargs = {"num_replicas": 1, "rank": 0, "seed": 3, **kwargs}
    return BalancedSampler(Items(labels), labels, **kwargs)


def epoch(s: BalancedSampler, number: int) -> list[int]:
    s.set_epoch(number)
    pairs = list(s)
    assert all(e == number for _, e in pairs)  # (index, epoch): augmentation seeded by both
    return [index for index, _ in pairs]


def test_classes_are_drawn_evenly_on_a_1_to_10_dataset():
    s = sampler()
    assert isinstance(s, DistributedSampler) and isinstance(s, EpochShuffleSampler)  # Lightning leaves it in place
    drawn = Counter(LABELS[i] for n in range(5) for i in epoch(s, n))
    assert sum(drawn.values()) == 5 * len(LABELS)
    assert abs(drawn[0] - drawn[1]) < 0.1 * sum(drawn.values())  # expected 275 each, sd ~12
    minority = Counter(i for n in range(5) for i in epoch(s, n) if LABELS[i] == 0)
    assert len(minority) == 10  # every minority image is used, repeated


def test_order_is_a_function_of_seed_and_epoch():
    assert epoch(sampler(), 2) == epoch(sampler(), 2)
    assert epoch(sampler(), 2) != epoch(sampler(), 3)
    assert epoch(sampler(), 2) != epoch(sampler(seed=4), 2)


@pytest.mark.parametrize("size", [110, 111])  # divides by 2, and padded by one
def test_two_ranks_shard_the_one_process_draw_by_position(size):
    labels = LABELS + [0] * (size - len(LABELS))
    whole = epoch(sampler(labels), 1)
    rank0, rank1 = (epoch(sampler(labels, num_replicas=2, rank=r), 1) for r in (0, 1))
    assert len(rank0) == len(rank1) == (size + 1) // 2
    interleaved = [index for pair in zip(rank0, rank1) for index in pair]
    assert interleaved[:size] == whole
    assert interleaved[size:] == whole[: len(interleaved) - size]  # padding repeats the start, as DistributedSampler


def test_resume_continues_the_uninterrupted_order():
    uninterrupted = epoch(sampler(num_replicas=2, rank=1), 4)
    resumed = sampler(num_replicas=2, rank=1)
    resumed.resume_at(4, 16)
    assert [i for i, _ in resumed] == uninterrupted[16:]
    assert epoch(resumed, 5) == epoch(sampler(num_replicas=2, rank=1), 5)  # the next epoch is whole


def test_a_single_image_class_is_repeated_and_an_empty_class_never_drawn(caplog):
    labels = [0] + [1] * 30 + [3] * 30  # class 2: no train images
    with caplog.at_level(logging.INFO, logger="finetune.data.sampling"):
        s = sampler(labels, num_classes=4)
    drawn = Counter(labels[i] for n in range(10) for i in epoch(s, n))
    assert 2 not in drawn and all(180 < drawn[c] < 230 for c in (0, 1, 3))  # expected 203 each
    assert s.class_counts == [1, 30, 0, 30]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [m for level, m in messages if level == logging.WARNING] == [
        "Balanced sampling: class(es) [2] have no training images and are never drawn"
    ]
    info = [m for level, m in messages if level == logging.INFO]
    assert len(info) == 1 and "1 of 4 classes have fewer than 5 training images" in info[0]
    caplog.clear()
    sampler(labels, num_classes=4, num_replicas=2, rank=1)
    assert not caplog.records  # said once, by rank 0


def write_pngs(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * i % 255, np.uint8)).save(folder / f"{i}.png")


def test_the_train_loader_uses_it_with_sampler_balanced(tmp_path):
    for split, (few, many) in {"train": (1, 10), "val": (1, 1)}.items():
        write_pngs(tmp_path / split / "few", few)
        write_pngs(tmp_path / split / "many", many)
    dm = ImageFolderDataModule(str(tmp_path), backbone="resnet18", image_size=8, batch_size=4, num_workers=0)
    assert dm.class_counts == [1, 10] and dm.train_labels() == [0] + [1] * 10
    train = dm.dataset(dm.splits.train, train=True)
    assert type(data_loader(dm, train, shuffle=True).sampler) is EpochShuffleSampler  # the default
    dm.hparams.sampler = "balanced"
    loader = data_loader(dm, train, shuffle=True)
    assert isinstance(loader.sampler, BalancedSampler) and loader.sampler.class_counts == [1, 10]
    drawn = Counter(dm.train_labels()[i] for n in range(4) for i in epoch(loader.sampler, n))
    assert drawn[0] > 10  # the single image is drawn about half the time, not 1 in 11
    assert data_loader(dm, train, shuffle=False).sampler.__class__.__name__ == "SequentialSampler"  # eval: in order


def test_no_labels_is_a_one_line_error():
    segmentation = object.__new__(SegmentationFolderDataModule)  # its items are (image, mask)
    segmentation.splits = Splits([("a.png", "a_mask.png")], [], [])
    message = "data.sampler: balanced needs one class label per image; SegmentationFolderDataModule has none"
    with pytest.raises(ValueError, match=message):
        segmentation.train_labels()
    plain = SimpleNamespace(trainer=None, hparams=SimpleNamespace(seed=0, sampler="balanced", batch_size=2))
    with pytest.raises(ValueError, match="SimpleNamespace has none"):  # a DataModule without train_labels
        train_sampler(plain, Items([0, 1]))
