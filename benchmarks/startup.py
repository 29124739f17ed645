"""Start-up cost at many files, and shards against the folder pipeline, in one run.

    python benchmarks/startup.py                       # 10k and 100k tiny images under /tmp/finetune-startup
    python benchmarks/startup.py --sizes 10000         # 10k only (~1 min): what a fresh clone checks
    python benchmarks/startup.py --sizes 10000,100000,1000000   # 1M too, where the disk allows (~4 GB of inodes)

For each size it writes a folder of N 16x16 PNGs in 10 class folders (kept and reused), then
times `finetune fit` (in this process: the imports, paid once per process, are not counted)
from the start of the command to its first training step:

- cold: an empty cache ($FINETUNE_CACHE in a fresh folder): list, screen and split every file;
- cached: the same command again: the screening read from the cache.

"per file" is (cold - cached) / N: what listing and screening cost a file. Then, on the first
size, it writes the folder as shards (`finetune prepare`) and pushes one epoch of the training
DataLoader (crop, flip, uint8 batches; no model) through the folder pipeline and the shard
pipeline with the same workers, and prints images/s and their ratio.

Targets (issue 20): cached start-up at 1M files <= 10 s; shards >= the folder's images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = 10
SIDE = 16


def write_folder(root: Path, count: int) -> Path:
    """`root/<class>/<n>.png`, `count` 16x16 PNGs (made once; a finished folder has a marker)."""
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (CLASSES, 3))
    buffers = {}
    for label in range(CLASSES):  # a few variants a class, written over and over: fast to make
        (root / f"class{label}").mkdir(parents=True)
        variants = []
        for _ in range(4):
            pixels = np.clip(palette[label] + rng.normal(0, 30, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            path = Path(tempfile.mkstemp(suffix=".png")[1])
            Image.fromarray(pixels).save(path)
            variants.append(path.read_bytes())
            path.unlink()
        buffers[label] = variants
    for i in range(count):
        label = i % CLASSES
        (root / f"class{label}" / f"{i:07d}.png").write_bytes(buffers[label][i % 4])
    done.touch()
    return root


class FirstStep(L.Callback):
    """Notes when the first training batch starts, then ends the run."""

    def __init__(self):
        self.at: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at is None:
            self.at = time.perf_counter()
        trainer.should_stop = True


def time_to_first_step(data: Path, cache: Path, workers: int) -> float:
    from finetune.cli import create_cli

    os.environ["FINETUNE_CACHE"] = str(cache)
    first = FirstStep()
    start = time.perf_counter()
    cli = create_cli([
        "--model.class_path", "finetune.tasks.ClassificationTask", "--model.backbone", "resnet18",
        "--model.pretrained", "false",
        "--data.class_path", "finetune.data.ImageFolderDataModule", "--data.root", str(data),
        "--data.image_size", "32", "--data.batch_size", "64", "--data.num_workers", str(workers),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(cache / "run"),
    ], run=False)
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, cli.datamodule)
    return first.at - start


def images_per_second(datamodule, epochs: int = 1) -> float:
    loader = datamodule.train_dataloader()
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated file counts")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "finetune-startup")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="DataLoader workers")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} CPUs, {args.workers} workers, data under {args.data}")
    print("| files | cold start-up s | cached start-up s | per file (cold - cached) |")
    print("|---:|---:|---:|---:|")
    for size in sizes:
        made = time.perf_counter()
        folder = write_folder(args.data / f"{size}", size)
        made = time.perf_counter() - made
        with tempfile.TemporaryDirectory() as cache:
            cold = time_to_first_step(folder, Path(cache), args.workers)
            cached = time_to_first_step(folder, Path(cache), args.workers)
        print(f"| {size:,} | {cold:.2f} | {cached:.2f} | {(cold - cached) / size * 1e6:.0f} us |"
              + (f" (folder written in {made:.0f} s)" if made > 1 else ""))

    from finetune.data import ImageFolderDataModule, ShardDataModule
    from finetune.prepare import write_shards

    size = sizes[0]
    folder = args.data / f"{size}"
    shards = args.data / f"{size}-shards"
    settings = dict(backbone="resnet18", image_size=32, batch_size=64, num_workers=args.workers)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FINETUNE_CACHE"] = cache
        folder_dm = ImageFolderDataModule(str(folder), **settings)
        if not (shards / "finetune_shards.json").exists():
            write_shards(folder_dm, shards, overwrite=True, echo=lambda line: None)
        shard_dm = ShardDataModule(str(shards), **settings)
        rates = {}
        for name, dm in (("folder", folder_dm), ("shards", shard_dm), ("folder again", folder_dm), ("shards again", shard_dm)):
            rates[name] = images_per_second(dm)
    best = {kind: max(rates[kind], rates[f"{kind} again"]) for kind in ("folder", "shards")}
    print(f"\ntraining loader, {size:,} images, {args.workers} workers (best of 2 epochs each): folder {best['folder']:.0f} img/s, "
          f"shards {best['shards']:.0f} img/s, ratio {best['shards'] / best['folder']:.2f}")


if __name__ == "__main__":
    main()
