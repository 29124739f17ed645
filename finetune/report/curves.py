"""Loss and metric curves over epochs, from a MetricHistory."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from finetune.report.drawing import new_figure, save
from finetune.report.history import MetricHistory

PANELS_PER_ROW = 3


def loss_names(history: MetricHistory) -> list[str]:
    """`train/loss_epoch`, `val/loss` and the like: every split's loss."""
    return [name for name in history.names() if name.count("/") == 1 and name.split("/")[1] in ("loss", "loss_epoch")]


def validation_metric_names(history: MetricHistory) -> list[str]:
    """`val/<metric>` besides the loss; per-class values (`val/acc_class/<name>`) stay in metrics.csv."""
    return [name for name in history.names() if name.startswith("val/") and name.count("/") == 1 and name != "val/loss"]


def plot_losses(history: MetricHistory, path: Path) -> None:
    figure = new_figure(6, 4)
    axes = figure.subplots()
    for name in loss_names(history):
        axes.plot(*history.series(name), marker="o", label=name)
    axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    axes.grid(alpha=0.3)
    save(figure, path)


def plot_metrics(history: MetricHistory, path: Path) -> None:
    """One small panel per validation metric: their scales differ (accuracy, EER, ...)."""
    names = validation_metric_names(history)
    columns = min(PANELS_PER_ROW, len(names))
    rows = math.ceil(len(names) / columns)
    figure = new_figure(3.2 * columns, 2.6 * rows)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, name in zip(panels, names):
        epochs, values = history.series(name)
        axes.plot(epochs, values, marker="o")
        axes.set(title=name, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for axes in panels[len(names):]:
        axes.set_visible(False)
    save(figure, path)
