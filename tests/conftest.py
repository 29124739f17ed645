"""Shared fixtures: tiny generated images, so no test needs the network or a dataset."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_colour_images(folder: Path, per_class: int, seed: int, size: int = 24) -> None:
    """A learnable set: each class is a noisy image of one dominant colour."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASS_COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, (size, size, 3))
            pixels = np.clip(np.array(colour) * rng.uniform(0.6, 1.2) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}_{i:03d}.png")


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """root/{train,val}/<colour>/*.png with 16 train and 8 val images per class."""
    root = tmp_path_factory.mktemp("colours")
    write_colour_images(root / "train", 16, seed=0)
    write_colour_images(root / "val", 8, seed=1)
    return root


@pytest.fixture(autouse=True)
def _no_wandb_in_home(tmp_path, monkeypatch):
    """W&B must never need a login or write to the home folder during tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(var, raising=False)


def write_shape_images(folder: Path, count: int, seed: int, size: int = 48) -> None:
    """A learnable segmentation set: red and blue squares (classes 1, 2) on grey noise (0)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = rng.normal(128, 30, (size, size, 3))
        mask = np.zeros((size, size), dtype=np.uint8)
        for label, colour in ((1, (210, 40, 40)), (2, (40, 40, 210))):
            side = rng.integers(10, 20)
            top, left = rng.integers(0, size - side, 2)
            image[top:top + side, left:left + side] = np.array(colour) + rng.normal(0, 20, (side, side, 3))
            mask[top:top + side, left:left + side] = label
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:03d}.png")


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """root/{train,val}/{images,masks} + classes.yaml: 24 train and 8 val images of 48 px."""
    root = tmp_path_factory.mktemp("shapes")
    write_shape_images(root / "train", 24, seed=0)
    write_shape_images(root / "val", 8, seed=1)
    (root / "classes.yaml").write_text("- background\n- red\n- blue\n")
    return root


def write_identities(root: Path, names: list[str], per_identity: int, seed: int, size: int = 32) -> None:
    """Identities as 3x3 colour layouts, seen shifted, dimmed and noisy: learnable, but an
    untrained network only partly separates them."""
    rng = np.random.default_rng(seed)
    for number, name in enumerate(names):
        grid = np.random.default_rng([seed, number]).integers(0, 256, (3, 3, 3))
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_identity):
            image = np.kron(grid, np.ones((size // 3 + 1, size // 3 + 1, 1)))[:size, :size]
            image = np.roll(image, rng.integers(-3, 4, 2), axis=(0, 1)) * rng.uniform(0.6, 1.3)
            image = image + rng.normal(0, 35, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="session")
def identity_folder(tmp_path_factory) -> Path:
    """root/train (40 identities) and root/val (15 other identities), 6 images each."""
    root = tmp_path_factory.mktemp("identities")
    write_identities(root / "train", [f"id{i:02d}" for i in range(40)], 6, seed=0)
    write_identities(root / "val", [f"held{i:02d}" for i in range(15)], 6, seed=1)
    return root


@pytest.fixture(scope="session")
def one_process_weights(colour_folder, tmp_path_factory) -> dict:
    """What `finetune fit` on 1 process with the global batch of the 2-process runs
    (tests/launch.py) ends with: the weights every multi-process run must reach."""
    from launch import fit_args

    from finetune.cli import create_cli

    cli = create_cli(["fit", *fit_args(colour_folder, tmp_path_factory.mktemp("one_process"), 16)])
    assert cli.trainer.global_step == 12  # 4 epochs of 48 images in batches of 16
    return {k: v.clone() for k, v in cli.model.state_dict().items()}
