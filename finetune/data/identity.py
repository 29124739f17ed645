"""DataModule for identity embeddings: `root/<identity>/*`, validated open-set.

The split is by identity: validation identities never appear in training, as in the LFW,
CFP and AgeDB protocols, so the metrics say how the embedding does on people it never saw.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from finetune.data.classification import ImageFolderDataModule
from finetune.data.folder import FolderSplits, Sample, class_folders, list_images

log = logging.getLogger(__name__)


def identity_samples(folder: Path) -> tuple[list[str], list[Sample]]:
    names, samples = [], []
    for identity in class_folders(folder):
        images = list_images(identity)
        if images:
            samples += [(str(p), len(names)) for p in images]
            names.append(identity.name)
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
    ):
        self.val_identity_names: list[str] = []
        super().__init__(
            root, backbone, val_fraction, seed, batch_size, num_workers, image_size, mean, std, crop_pct,
            interpolation, scale, hflip, predict_root,
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

    def scan_folder(self, root: str, val_fraction: float, seed: int) -> FolderSplits:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"data.root: {root_path} is not a folder; point it at root/<identity>/* images")
        if (root_path / "train").is_dir() and (root_path / "val").is_dir():
            train_names, train = identity_samples(root_path / "train")
            self.val_identity_names, val = identity_samples(root_path / "val")
        else:
            names, samples = identity_samples(root_path)
            train_names, train, self.val_identity_names, val = split_identities(names, samples, val_fraction, seed)
        if len(train_names) < 2 or len(self.val_identity_names) < 2:
            raise ValueError(
                f"data.root: {root_path} gives {len(train_names)} training and {len(self.val_identity_names)} validation "
                "identities; each needs at least 2 (add identity folders or change data.val_fraction)"
            )
        singles = sum(1 for n in Counter(label for _, label in train).values() if n == 1)
        if singles:
            log.info("%d training identities have a single image: they train the margin head but form no positive pair", singles)
        return FolderSplits(train_names, train, val, [])

    def val_index_of(self) -> dict[tuple[str, int], int]:
        """(identity, 1-based image number in file order) -> row in the validation set (LFW numbering)."""
        index, counts = {}, {}
        for row, (_, label) in enumerate(self.splits.val):
            name = self.val_identity_names[label]
            counts[name] = counts.get(name, 0) + 1
            index[(name, counts[name])] = row
        return index
