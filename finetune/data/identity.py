"""DataModule for identity embeddings: `root/<identity>/*`, validated open-set.

The split is by identity: validation identities never appear in training, as in the LFW,
CFP and AgeDB protocols, so the metrics say how the embedding does on people it never saw.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from finetune.data.classification import ImageFolderDataModule
from finetune.data.folder import Sample, class_folders, list_image_paths
from finetune.data.splits import Splits

log = logging.getLogger(__name__)


def identity_samples(folder: Path, screen=None) -> tuple[list[str], list[Sample]]:
    """Identities (sub-folders) with images, and their images. With `screen` (the DataModule's
    checks) unusable files are left out, and so is an identity left without any."""
    listed = [(identity, list_image_paths(identity)) for identity in class_folders(folder)]
    good = screen.keep([p for _, images in listed for p in images]) if screen is not None else None
    names, samples = [], []
    for identity, images in listed:
        usable = images if good is None else [p for p in images if p in good]
        if usable:
            samples += [(p, len(names)) for p in usable]
            names.append(identity.name)
        elif screen is not None:
            screen.drop(identity, "identity folder with no readable image" if images else "empty identity folder")
    return names, samples


def split_identities(names: list[str], samples: list[Sample], val_fraction: float, seed: int):
    """Hold out `val_fraction` of the identities (all their images), reproducibly for `seed`."""
    held_out = set(random.Random(seed).sample(range(len(names)), round(len(names) * val_fraction)))
    train_ids = [i for i in range(len(names)) if i not in held_out]
    val_ids = sorted(held_out)
    remap = lambda ids: {old: new for new, old in enumerate(ids)}  # noqa: E731
    train_map, val_map = remap(train_ids), remap(val_ids)
    train = [(p, train_map[label]) for p, label in samples if label in train_map]
    val = [(p, val_map[label]) for p, label in samples if label in val_map]
    return [names[i] for i in train_ids], train, [names[i] for i in val_ids], val


class IdentityFolderDataModule(ImageFolderDataModule):
    """Images in `root/<identity>/*` (identities split by `val_fraction`) or
    `root/{train,val}/<identity>/*`. Faces are expected detected and aligned already (as in
    insightface's 112x112 crops), so the default eval transform does not centre-crop
    (`crop_pct` 1.0) and training crops stay gentle (`scale` 0.8-1.0).

    `pairs_file`: an LFW-format pairs list over the validation identities (relative to `root`
    or absolute); without it, verification uses seeded balanced pairs.
    """

    def __init__(
        self,
        root: str,
        backbone: str = "resnet50",
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int | None = None,
        image_size: int | None = 112,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        crop_pct: float | None = 1.0,
        interpolation: str | None = None,
        scale: tuple[float, float] = (0.8, 1.0),
        hflip: float = 0.5,
        pairs_file: str | None = None,
        predict_root: str | None = None,
        on_bad_image: Literal["skip", "raise"] = "skip",
    ):
        self.val_identity_names: list[str] = []
        super().__init__(
            root, backbone, val_fraction, seed, batch_size, num_workers, image_size, mean, std, crop_pct,
            interpolation, scale, hflip, predict_root, on_bad_image=on_bad_image,
        )
        self.pairs_path = self._pairs_path(root, pairs_file)

    @staticmethod
    def _pairs_path(root: str, pairs_file: str | None) -> Path | None:
        if pairs_file is None:
            return None
        path = Path(pairs_file) if Path(pairs_file).is_absolute() else Path(root) / pairs_file
        if not path.is_file():
            raise FileNotFoundError(f"data.pairs_file: {path} does not exist")
        return path

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> Splits[Sample]:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"data.root: {root_path} is not a folder; point it at root/<identity>/* images")
        if (root_path / "train").is_dir() and (root_path / "val").is_dir():
            train_names, train = identity_samples(root_path / "train", self.screening)
            self.val_identity_names, val = identity_samples(root_path / "val", self.screening)
        else:
            names, samples = identity_samples(root_path, self.screening)
            train_names, train, self.val_identity_names, val = split_identities(names, samples, val_fraction, seed)
        if len(train_names) < 2 or len(self.val_identity_names) < 2:
            raise ValueError(
                f"data.root: {root_path} gives {len(train_names)} training and {len(self.val_identity_names)} validation "
                "identities; each needs at least 2 (add identity folders or change data.val_fraction)"
            )
        singles = sum(1 for n in Counter(label for _, label in train).values() if n == 1)
        if singles:
            log.info("%d training identities have a single image: they train the margin head but form no positive pair", singles)
        return Splits(train, val, [], class_names=train_names, val_names=self.val_identity_names)

    def val_index_of(self) -> dict[tuple[str, int], int]:
        """(identity, 1-based image number in file order) -> row in the validation set (LFW numbering)."""
        index, counts = {}, {}
        for row, (_, label) in enumerate(self.splits.val):
            name = self.val_identity_names[label]
            counts[name] = counts.get(name, 0) + 1
            index[(name, counts[name])] = row
        return index
