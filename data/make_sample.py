"""Regenerate data/fashion-mnist-sample/ from the Fashion-MNIST files (MIT licence).

    apt-get install dataset-fashion-mnist      # Debian: installs the files offline
    python data/make_sample.py                 # or: --source DIR --train 100 --val 20

Takes the first N images of each class from Fashion-MNIST's train split for train/ and
from its test split for val/, so the sample's val images are never in any train set.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path) -> None:
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).save(folder / f"{name}_{i:03d}.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "fashion-mnist-sample")
    parser.add_argument("--train", type=int, default=100, help="images per class in train/")
    parser.add_argument("--val", type=int, default=20, help="images per class in val/")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    for split, prefix, per_class in (("train", "train", args.train), ("val", "t10k", args.val)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        write_split(images, labels, per_class, args.out / split)
    print(f"wrote {len(CLASSES) * (args.train + args.val)} images to {args.out}")


if __name__ == "__main__":
    main()
