"""Framework overhead per training step: Lightning + our task against a raw PyTorch loop.

    python benchmarks/overhead.py            # prints ms/step for each and the difference

The same tiny ResNet (timm's resnet18 layout with 1 block per stage and 8-64 channels, 91 k
parameters) on the same in-memory batches, on CPU, one thread, so that compute is small and
what is left is overhead: Lightning's loop and hooks, our task's metric updates, logging and
LR bookkeeping. A minimal LightningModule around the same network separates Lightning's own
cost from our task's. Both use AdamW over our parameter groups with the cosine schedule stepped each
step. A run's figure is the median time from one step's start to the next (all of Lightning's
work between steps included); each setting is run `--repeats` times, interleaved, and the
fastest run is kept (on a shared machine, the one least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import finetune.tasks.classification as classification  # noqa: E402
from finetune.backbones import create_backbone  # noqa: E402
from finetune.tasks.classification import ClassificationTask  # noqa: E402

TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)


def tiny_task() -> ClassificationTask:
    # The same starting weights in every run: the compute of a step then differs by nothing.
    torch.manual_seed(0)
    # The task builds its backbone by name; give it timm's resnet18 layout at toy width.
    classification.create_backbone = partial(create_backbone, **TINY_RESNET)
    try:
        return ClassificationTask(num_classes=10, backbone="resnet18", pretrained=False, lr=1e-3, warmup_epochs=0)
    finally:
        classification.create_backbone = create_backbone


def batches(count: int, batch_size: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(batch_size, 3, size, size, generator=generator),
         "label": torch.randint(0, 10, (batch_size,), generator=generator)}
        for _ in range(count)
    ]


def raw_loop(data: list[dict], warmup: int) -> float:
    """ms/step of the loop a user would write by hand, same model, optimizer and schedule."""
    task = tiny_task()
    optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(data))
    task.train()
    starts = []
    for batch in data:
        starts.append(time.perf_counter())
        loss = F.cross_entropy(task(batch["image"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    starts.append(time.perf_counter())
    return median_step_ms(starts, warmup)


def median_step_ms(starts: list[float], warmup: int) -> float:
    """Median time from one step's start to the next's, after `warmup` steps. The median, not
    the mean: a step slowed by another process on a shared machine does not move it."""
    return statistics.median(b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])) * 1000


class MinimalModule(L.LightningModule):
    """The same network and optimizer in the smallest LightningModule: Lightning's own floor."""

    def __init__(self):
        super().__init__()
        self.task = tiny_task()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.task(batch["image"]), batch["label"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.task.param_groups(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Batches:
    """The in-memory batches as one loader (Lightning reads a bare list as several loaders)."""

    def __init__(self, data: list[dict]):
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class StepTimer(L.Callback):
    """Start times of every step and the end of the last: everything Lightning does between
    two steps is inside an interval."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def lightning_loop(data: list[dict], warmup: int, logged: bool, save_dir: str, module=None) -> float:
    """ms/step through Trainer.fit. `logged`: as a user's run is, with a progress bar and a
    logger writing every 50 steps; otherwise bare (no bar, no logger, no checkpoint)."""
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[timer],
        enable_progress_bar=logged, log_every_n_steps=50,
        logger=L.pytorch.loggers.CSVLogger(save_dir) if logged else False, default_root_dir=save_dir,
    )
    trainer.fit(module or tiny_task(), train_dataloaders=Batches(data))
    return median_step_ms(timer.starts, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--save_dir", default="/tmp/finetune-overhead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = batches(args.steps + args.warmup, args.batch, args.size)
    runs = {
        "raw PyTorch loop": [], "Lightning + minimal module": [],
        "Lightning + task, bare": [], "Lightning + task, bar + logger": [],
    }
    for _ in range(args.repeats):
        runs["raw PyTorch loop"].append(raw_loop(data, args.warmup))
        runs["Lightning + minimal module"].append(lightning_loop(data, args.warmup, False, args.save_dir, MinimalModule()))
        runs["Lightning + task, bare"].append(lightning_loop(data, args.warmup, False, args.save_dir))
        runs["Lightning + task, bar + logger"].append(lightning_loop(data, args.warmup, True, args.save_dir))
    best = {name: min(times) for name, times in runs.items()}
    raw = best["raw PyTorch loop"]
    print(f"\n{args.steps} steps of batch {args.batch} at {args.size} px, 1 thread, median step, best of {args.repeats}")
    for name, ms in best.items():
        extra = "" if name.startswith("raw") else f"   {ms - raw:+.3f} ms/step against raw"
        print(f"{name:<32} {ms:7.3f} ms/step{extra}")
    overhead = best["Lightning + task, bare"] - raw
    ours = best["Lightning + task, bare"] - best["Lightning + minimal module"]
    print(f"\nframework overhead (Lightning + task, bare, against raw): {overhead:.3f} ms/step "
          f"(target <= 1 ms): {'met' if overhead <= 1.0 else 'MISSED'}")
    print(f"  of which our task (metrics, logging, LR bookkeeping) over a minimal LightningModule: {ours:+.3f} ms/step")


if __name__ == "__main__":
    main()
