"""What a validation shows, one PNG each: confusion matrix, per-class bars, mask overlays,
ROC and similarity histograms. Inputs are plain numbers and numpy arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.patches import Patch

from finetune.report.drawing import new_figure, save

# Past these, labels would overlap: cells lose their numbers, axes their class names.
MAX_ANNOTATED_CLASSES = 15
MAX_TICK_LABELS = 40
# Bar charts show at most this many classes: the lowest ones, where the problems are.
MAX_BARS = 40


def plot_confusion_matrix(counts: np.ndarray, fractions: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Counts beside each true class's row as fractions (its recall on the diagonal), so that
    a rare class's errors are as visible as a common one's."""
    n = len(class_names)
    side = min(4 + 0.35 * n, 14)
    figure = new_figure(2 * side, side)
    for axes, values, title, fmt in zip(
        figure.subplots(1, 2), (counts, fractions), ("counts", "per true class"), ("{:.0f}", "{:.2f}")
    ):
        image = axes.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axes, shrink=0.8)
        axes.set(title=f"Validation confusion matrix, {title}", xlabel="predicted", ylabel="true")
        if n <= MAX_TICK_LABELS:
            axes.set_xticks(range(n), class_names, rotation=90)
            axes.set_yticks(range(n), class_names)
        if n <= MAX_ANNOTATED_CLASSES:
            high = values.max() / 2 if values.size else 0
            for (i, j), value in np.ndenumerate(values):
                axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                          color="white" if value > high else "black")
    save(figure, path)


def plot_bars(values: Sequence[float], names: Sequence[str], title: str, xlabel: str, path: Path) -> None:
    """Horizontal bars per class, the mean as a line; NaN (no validation sample) as `n/a`.
    Above MAX_BARS classes, only the lowest are shown."""
    values = np.asarray(values, dtype=float)
    order = np.arange(len(values))
    if len(values) > MAX_BARS:
        order = np.argsort(np.nan_to_num(values, nan=np.inf))[:MAX_BARS]
        title = f"{title} ({MAX_BARS} lowest of {len(values)})"
    shown, labels = values[order], [names[i] for i in order]
    figure = new_figure(7, 1.2 + 0.3 * len(order))
    axes = figure.subplots()
    rows = np.arange(len(order))
    axes.barh(rows, np.nan_to_num(shown), color="tab:blue")
    for row, value in zip(rows, shown):
        axes.text(0.01 if math.isnan(value) else value + 0.01, row, "n/a" if math.isnan(value) else f"{value:.3f}",
                  va="center", fontsize=8)
    if np.isfinite(values).any():
        mean = float(np.nanmean(values))
        axes.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
        axes.legend(loc="lower right")
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()  # first class on top, as in the table
    axes.set(xlim=(0, 1.1), xlabel=xlabel, title=title)
    save(figure, path)


def overlay(picture: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int,
            alpha: float = 0.5) -> np.ndarray:
    """`picture` (H, W, 3 uint8) blended with each pixel's class colour; ignored pixels (and
    labels outside the palette) keep the picture."""
    colours = np.asarray(palette, dtype=float)
    labelled = (mask != ignore_index) & (mask >= 0) & (mask < len(colours))
    blended = picture.astype(float)
    blended[labelled] = (1 - alpha) * blended[labelled] + alpha * colours[mask[labelled]]
    return blended.round().astype(np.uint8)


def plot_masks(pictures: Sequence[np.ndarray], truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
               palette: Sequence[Sequence[int]], class_names: Sequence[str], ignore_index: int, path: Path) -> None:
    """A row per image: the image, the true mask over it, the predicted mask over it."""
    figure = new_figure(7.5, 2.4 * len(pictures) + 0.6)
    grid = figure.subplots(len(pictures), 3, squeeze=False)
    for row, picture, truth, prediction in zip(grid, pictures, truths, predictions):
        # Pixels without a label (the batch's padding, void borders) are not scored: not coloured either.
        scored = np.where(truth == ignore_index, ignore_index, prediction)
        shown = (picture, overlay(picture, truth, palette, ignore_index), overlay(picture, scored, palette, ignore_index))
        for axes, image in zip(row, shown):
            axes.imshow(image)
            axes.axis("off")
    for axes, title in zip(grid[0], ("image", "true mask", "predicted mask")):
        axes.set_title(title)
    handles = [Patch(color=np.asarray(c) / 255, label=name) for c, name in zip(palette, class_names)]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    save(figure, path)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, auc: float | None = None) -> None:
    """True accepts against false accepts, false accepts on a log axis: verification is judged
    at small FAR (TAR@FAR=1e-3)."""
    figure = new_figure(6, 4.5)
    axes = figure.subplots()
    positive = fpr > 0  # a log axis has no 0
    label = "ROC" if auc is None or math.isnan(auc) else f"ROC (AUC {auc:.4f})"
    axes.plot(fpr[positive], tpr[positive], label=label)
    axes.set_xscale("log")
    axes.set(xlabel="false accept rate", ylabel="true accept rate", ylim=(0, 1.02),
             title="Open-set verification ROC")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="lower right")
    save(figure, path)


def plot_similarity(genuine: np.ndarray, impostor: np.ndarray, path: Path) -> None:
    """Cosine similarity of same-identity (genuine) and different-identity (impostor) pairs:
    the less they overlap, the better a threshold separates them."""
    figure = new_figure(6, 4)
    axes = figure.subplots()
    bins = np.linspace(-1, 1, 81)
    axes.hist(impostor, bins=bins, density=True, alpha=0.6, label=f"impostor ({len(impostor)} pairs)")
    axes.hist(genuine, bins=bins, density=True, alpha=0.6, label=f"genuine ({len(genuine)} pairs)")
    axes.set(xlabel="cosine similarity", ylabel="density", title="Validation pair similarities")
    axes.legend()
    save(figure, path)
