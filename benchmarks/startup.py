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
(smallest) size and on 2000 photo-like 500x375 JPEGs, it writes the folder as shards (`finetune prepare`)
and pushes two epochs of the training DataLoader (crop, flip, uint8 batches; no model) through
the folder pipeline and the shard pipeline with the same workers, and prints the second
epoch's images/s (the workers persist, as in training) and their ratio (best of 2, interleaved).

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
    for label in range(CLASSES):
        (root / f"class{label}").mkdir(parents=True)
    for i in range(count):  # every image different: duplicates would be reported, not timed
        label = i % CLASSES
        pixels = np.clip(palette[label] + rng.normal(0, 30, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{i:07d}.png")
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
        "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(cache / "run"),
    ], run=False)
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, cli.datamodule)
    return first.at - start


def images_per_second(datamodule) -> float:
    """The second epoch of one loader: its workers persist across epochs as in training, so
    starting them (and LitData's reader in each) is not counted."""
    loader = datamodule.train_dataloader()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        count, start = 0, time.perf_counter()
        for batch in loader:
            count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated file counts")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "finetune-startup")
    parser.add_argument("--photos", type=int, default=2000, help="500x375 JPEGs for the loader comparison")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="DataLoader workers")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} CPUs, {args.workers} workers, data under {args.data}", flush=True)
    for size in sizes:
        write_folder(args.data / f"{size}", size)
    # The loaders first: after the in-process `fit` runs below, a second DataLoader of the same
    # process stalled here (idle in poll) once; fresh, it does not.
    from finetune.data import ImageFolderDataModule, ShardDataModule
    from finetune.prepare import write_shards

    print("\n| training loader (crop, flip, uint8; no model) | folder img/s | shards img/s | ratio |")
    print("|---|---:|---:|---:|")
    photos = write_photos(args.data / "photos", args.photos)
    smallest = min(sizes)
    for name, folder, size in ((f"{smallest:,} 16-px PNGs @32", args.data / f"{smallest}", 32),
                               (f"{args.photos:,} 500x375 JPEGs @224", photos, 224)):
        shards = folder.with_name(folder.name + "-shards")
        settings = dict(backbone="resnet18", image_size=size, batch_size=64, num_workers=args.workers)
        with tempfile.TemporaryDirectory() as cache:
            os.environ["FINETUNE_CACHE"] = cache
            folder_dm = ImageFolderDataModule(str(folder), **settings)
            if not (shards / "finetune_shards.json").exists():
                write_shards(folder_dm, shards, overwrite=True, echo=lambda line: None)
            shard_dm = ShardDataModule(str(shards), **settings)
            rates = {"folder": [], "shards": []}
            for _ in range(2):  # interleaved, best of 2: this machine's speed drifts
                for kind, dm in (("folder", folder_dm), ("shards", shard_dm)):
                    rates[kind].append(images_per_second(dm))
        best = {kind: max(values) for kind, values in rates.items()}
        print(f"| {name} | {best['folder']:.0f} | {best['shards']:.0f} | {best['shards'] / best['folder']:.2f} |", flush=True)

    print()
    print("| files | cold start-up s | cached start-up s | per file (cold - cached) |")
    print("|---:|---:|---:|---:|")
    for size in sizes:
        folder = args.data / f"{size}"
        with tempfile.TemporaryDirectory() as cache:
            cold = time_to_first_step(folder, Path(cache), args.workers)
            cached = time_to_first_step(folder, Path(cache), args.workers)
        print(f"| {size:,} | {cold:.2f} | {cached:.2f} | {(cold - cached) / size * 1e6:.0f} us |", flush=True)


def write_photos(root: Path, count: int) -> Path:
    """`count` 500x375 photo-like JPEGs in 10 class folders (benchmarks/input_pipeline.py's generator)."""
    import cv2
    from input_pipeline import _photo  # beside this script

    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.cvtColor(_photo(rng, 500, 375), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    done.touch()
    return root

if __name__ == "__main__":
    main()
