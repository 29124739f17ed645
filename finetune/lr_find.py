"""`finetune lr-find` and `model.lr: auto`: Lightning's LR range test, printed as a number and a terminal plot."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path


def ascii_plot(xs: list[float], ys: list[float], mark: float | None = None, width: int = 64, height: int = 14) -> str:
    """Loss against log10(lr), so the plot is readable in any terminal and CI log."""
    points = [(math.log10(x), y) for x, y in zip(xs, ys) if x > 0 and math.isfinite(y)]
    if len(points) < 2:
        return "(too few finite points to plot)"
    lx = [p[0] for p in points]
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    high = min(high, low + 4 * (sorted(p[1] for p in points)[len(points) // 2] - low) + 1e-12)  # clip the blow-up
    grid = [[" "] * width for _ in range(height)]
    for x, y in points:
        col = round((x - lx[0]) / (lx[-1] - lx[0] or 1) * (width - 1))
        row = height - 1 - round((min(y, high) - low) / (high - low or 1) * (height - 1))
        grid[row][col] = "*"
    if mark:
        col = round((math.log10(mark) - lx[0]) / (lx[-1] - lx[0] or 1) * (width - 1))
        for row in grid:
            row[col] = "|" if row[col] == " " else row[col]
    lines = [f"{high:9.3f} +" + "".join(grid[0])] + ["          |" + "".join(r) for r in grid[1:-1]]
    lines += [f"{low:9.3f} +" + "".join(grid[-1]), f"          lr {xs[0]:.1e} … {xs[-1]:.1e} (log scale); | marks the suggestion"]
    return "\n".join(lines)


def valley(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's `valley` suggestion (fastai/callback/schedule.py), the default of its `lr_find`:
    the longest stretch over which the (smoothed) loss keeps falling, and the LR two thirds of
    the way down it, before the fall levels off.

    Written here because Lightning offers only the steepest-gradient point, which on the flat,
    noisy start of a fine-tune's curve (a pretrained network learns nothing at 1e-7) picked
    LRs around 2e-7 and training then stood still (benchmarks/recipes.py)."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if len(finite) < 3:
        return None
    lrs, losses = [p[0] for p in finite], [p[1] for p in finite]
    # longest[i]: the most points of a falling sequence that ends at i (O(n^2): n is ~100 steps)
    longest = [1] * len(losses)
    start = end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[end] < longest[i]:
            end, start = i, i - longest[i]
    third = (end - start) / 3
    return float(lrs[start + int(third) + int(third / 2)]) if end > start else None


@contextlib.contextmanager
def epochs_unbounded(trainer):
    """Lightning's range test stops at `max_epochs` too: on a small dataset (3 batches an epoch,
    2 epochs) it would end after 6 of its 100 steps with no suggestion. Lift the limit meanwhile
    (to a number, not -1: a schedule built meanwhile needs a finite length)."""
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = 1_000_000
    try:
        yield
    finally:
        trainer.fit_loop.max_epochs = max_epochs


def run_lr_find(trainer, model, datamodule, num_training: int = 100) -> float | None:
    from lightning.pytorch.tuner import Tuner

    with epochs_unbounded(trainer):
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, num_training=num_training, update_attr=False)
    suggestion = report(finder, trainer)
    if suggestion is not None:
        print(f"suggested learning rate: {suggestion:.2e}  (use it with --model.lr {suggestion:.2e} or --model.lr auto)")
    return suggestion


def report(finder, trainer) -> float | None:
    """The range test's curve to `<default_root_dir>/lr_find.csv`, W&B and the terminal; its suggestion."""
    if finder is None:
        return None
    lrs, losses = finder.results["lr"], finder.results["loss"]
    suggestion = valley(lrs, losses)
    if not trainer.is_global_zero:
        return suggestion
    out = Path(trainer.default_root_dir) / "lr_find.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        csv.writer(f).writerows([("lr", "loss"), *zip(lrs, losses)])
    for logger in trainer.loggers:
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            import wandb

            table = wandb.Table(data=[[lr, loss] for lr, loss in zip(lrs, losses)], columns=["lr", "loss"])
            logger.experiment.log({"lr_find": wandb.plot.line(table, "lr", "loss", title="LR range test")})
    print(ascii_plot(lrs, losses, suggestion))
    print(f"LR range test written to {out}")
    if suggestion is None:
        print("no learning rate suggested (the loss never fell steadily); see the plot")
    return suggestion
