"""Regenerate data/multilabel-sample/, a small multi-label set built from Fashion-MNIST (MIT licence).

    apt-get install dataset-fashion-mnist              # Debian: installs the files offline
    python data/make_multilabel_sample.py              # or: --source DIR --train 800 --val 200 --seed 0
    python data/make_multilabel_sample.py --baseline   # print the label-frequency baseline's mAP on val

Each image is a 56x56 grayscale composite: a 2x2 grid of 28-px cells on black, 1-3 of them
holding a Fashion-MNIST item; its labels are the distinct classes present. Classes are drawn
with uneven weights so label frequencies are skewed like a real tag set. Train images use
only Fashion-MNIST's train split and val images only its test split, each item at most once.

    multilabel-sample/
      images/train_0000.png ...  images/val_0000.png ...
      labels.csv                 # path,labels,split; labels ';'-separated in CLASSES order
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Reuse the single-label sample's class names and IDX reader; its folder is put on the path so
# this also runs as `python data/make_multilabel_sample.py` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample import CLASSES, read_idx  # noqa: E402

# Chance that an item is of each class (sums to 1). Skewed so that, with 1-3 items per image,
# the commonest label is in about 37 % of images and the rarest in about 5 %.
CLASS_WEIGHTS = {
    "t-shirt": 0.23,
    "sneaker": 0.17,
    "trouser": 0.14,
    "dress": 0.11,
    "bag": 0.09,
    "pullover": 0.08,
    "shirt": 0.06,
    "coat": 0.05,
    "sandal": 0.04,
    "ankle-boot": 0.03,
}
ITEMS_PER_IMAGE = (1, 2, 3)
ITEMS_PROBABILITIES = (0.4, 0.35, 0.25)
CELL = 28  # Fashion-MNIST's image size; the composite is a 2x2 grid of cells
GRID = 2


def compose_split(
    images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator, split: str
) -> list[tuple[np.ndarray, list[str]]]:
    """`count` composites and their sorted label names, each source item used at most once."""
    weights = np.array([CLASS_WEIGHTS[name] for name in CLASSES])
    # One shuffled queue of source items per class; taking from its front never repeats an item.
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(CLASSES))]
    composites = []
    for _ in range(count):
        n_items = rng.choice(ITEMS_PER_IMAGE, p=ITEMS_PROBABILITIES)
        classes = rng.choice(len(CLASSES), size=n_items, p=weights)
        cells = rng.permutation(GRID * GRID)[:n_items]
        canvas = np.zeros((GRID * CELL, GRID * CELL), dtype=np.uint8)
        for c, cell in zip(classes, cells):
            if not queues[c]:
                sys.exit(f"--{split}: the source has too few '{CLASSES[c]}' items for that many images; ask for fewer")
            row, col = divmod(int(cell), GRID)
            canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = images[queues[c].pop(0)]
        composites.append((canvas, [CLASSES[c] for c in sorted(set(classes.tolist()))]))
    return composites


def write_sample(source: Path, out: Path, n_train: int, n_val: int, seed: int) -> list[tuple[str, list[str], str]]:
    """Write images/ and labels.csv under `out` (replacing it); return the CSV rows."""
    # One generator per split, so changing --train leaves the val images unchanged.
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    # Everything is composed before `out` is touched, so a bad --source or count leaves it intact.
    composites = {}
    for split, prefix, count, rng in (("train", "train", n_train, train_rng), ("val", "t10k", n_val, val_rng)):
        paths = [source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"]
        for path in paths:
            if not path.is_file():
                sys.exit(f"--source: {path} not found; install dataset-fashion-mnist or pass --source DIR")
        images, labels = (read_idx(path) for path in paths)
        composites[split] = compose_split(images, labels, count, rng, split)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    rows = []
    for split, split_composites in composites.items():
        for i, (canvas, names) in enumerate(split_composites):
            relative = f"images/{split}_{i:04d}.png"
            Image.fromarray(canvas).save(out / relative, optimize=True)
            rows.append((relative, names, split))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "labels", "split"])
        writer.writerows((path, ";".join(names), split) for path, names, split in rows)
    return rows


def read_rows(out: Path) -> list[tuple[str, list[str], str]]:
    csv_path = out / "labels.csv"
    if not csv_path.is_file():
        sys.exit(f"--out: {csv_path} not found; run this script without --baseline first")
    with open(csv_path, newline="") as f:
        return [(row["path"], row["labels"].split(";"), row["split"]) for row in csv.DictReader(f)]


def label_matrix(rows: list[tuple[str, list[str], str]], split: str) -> np.ndarray:
    """0/1 matrix (images x CLASSES) of one split."""
    names = [names for _, names, row_split in rows if row_split == split]
    return np.array([[name in image_names for name in CLASSES] for image_names in names], dtype=np.int64)


def print_counts(rows: list[tuple[str, list[str], str]]) -> None:
    """Per-label image counts as a Markdown table, then the mean number of labels per image."""
    train, val = label_matrix(rows, "train"), label_matrix(rows, "val")
    print(f"| label | train ({len(train)}) | val ({len(val)}) |\n|---|---|---|")
    for j, name in enumerate(CLASSES):
        in_train, in_val = train[:, j], val[:, j]
        print(f"| {name} | {in_train.sum()} ({in_train.mean():.1%}) | {in_val.sum()} ({in_val.mean():.1%}) |")
    print(f"mean labels per image: train {train.sum(1).mean():.3f}, val {val.sum(1).mean():.3f}")


def print_baseline(rows: list[tuple[str, list[str], str]]) -> None:
    """mAP on val of scoring every image with each label's training frequency (a constant per label)."""
    try:
        import torch
        from torchmetrics.functional.classification import multilabel_average_precision
    except ImportError:
        sys.exit("--baseline needs torch and torchmetrics: pip install torchmetrics")
    train, val = label_matrix(rows, "train"), label_matrix(rows, "val")
    target = torch.from_numpy(val)
    preds = torch.from_numpy(train.mean(0)).float().expand(len(val), -1)
    for average in ("macro", "micro"):
        value = multilabel_average_precision(preds, target, num_labels=len(CLASSES), average=average)
        print(f"label-frequency baseline, val {average} mAP: {value.item():.4f}")
    # With a constant score a label's AP is its prevalence, so the macro mAP is the mean prevalence.
    print(f"mean val prevalence (expected macro mAP): {val.mean(0).mean():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "multilabel-sample")
    parser.add_argument("--train", type=int, default=800, help="composite images in the train split")
    parser.add_argument("--val", type=int, default=200, help="composite images in the val split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="only print counts and the baseline of --out")
    args = parser.parse_args()
    if args.baseline:
        rows = read_rows(args.out)
        print_counts(rows)
        print_baseline(rows)
        return
    for flag, value in (("--train", args.train), ("--val", args.val)):
        if value < 1:
            sys.exit(f"{flag}: must be at least 1, got {value}")
    rows = write_sample(args.source, args.out, args.train, args.val, args.seed)
    print(f"wrote {len(rows)} images and labels.csv to {args.out}")
    print_counts(rows)


if __name__ == "__main__":
    main()
