"""Which figures a run gets, from what its task keeps after validation (attributes the W&B
callbacks read too): `confusion_matrix`, `per_class_iou`, `roc` and `val_embeddings`,
`per_label`; plus the curves of the history and the mask sample the report keeps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.report.history import MetricHistory

# Pairs of at most this many embeddings (~2 M pairs): the histogram's shape, not every pair.
MAX_SIMILARITY_ITEMS = 2000

Draw = Callable[[Path], None]


@dataclass
class FigurePlan:
    filename: str
    caption: str
    draw: Draw


@dataclass
class MaskSample:
    """The first images of a validation batch with their true and predicted masks."""

    pictures: list[np.ndarray]  # (H, W, 3) uint8, as the model saw them before normalisation
    truths: np.ndarray  # (N, H, W) class indices
    predictions: np.ndarray
    palette: list[tuple[int, int, int]]
    ignore_index: int


def genuine_impostor_scores(embeddings: torch.Tensor, labels: torch.Tensor,
                            max_items: int = MAX_SIMILARITY_ITEMS) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of every pair of (unit) embeddings, split into same-label (genuine)
    and different-label (impostor) pairs. Above `max_items`, evenly spaced items are used."""
    if len(embeddings) > max_items:
        keep = torch.linspace(0, len(embeddings) - 1, max_items).round().long()
        embeddings, labels = embeddings[keep], labels[keep]
    embeddings, labels = embeddings.float().cpu(), labels.cpu()
    first, second = torch.triu_indices(len(embeddings), len(embeddings), offset=1)
    scores = (embeddings[first] * embeddings[second]).sum(dim=1)
    same = labels[first] == labels[second]
    return scores[same].numpy(), scores[~same].numpy()


def plan_figures(history: MetricHistory, pl_module, masks: MaskSample | None,
                 metrics: Mapping[str, float]) -> list[FigurePlan]:
    """The figures this run has data for, in the page's order. Drawing happens later, one by
    one, so that one failing figure costs only itself."""
    # Imported here: without matplotlib the report still has its table and metrics.csv. Functions
    # are looked up on their modules when drawn, so a test can make one of them fail.
    from finetune.report import curves, figures

    plans = []
    if curves.loss_names(history):
        plans.append(FigurePlan("loss.png", "Training and validation loss per epoch",
                                lambda path: curves.plot_losses(history, path)))
    if curves.validation_metric_names(history):
        plans.append(FigurePlan("metrics.png", "Validation metrics per epoch",
                                lambda path: curves.plot_metrics(history, path)))
    names = list(getattr(pl_module, "class_names", None) or [])
    matrix = getattr(pl_module, "confusion_matrix", None)
    if matrix is not None:
        plans.append(FigurePlan("confusion_matrix.png", "Confusion matrix of the last validation",
                                lambda path: _draw_confusion(matrix, _named(names, len(matrix)), path)))
    iou = getattr(pl_module, "per_class_iou", None)
    if iou is not None:
        plans.append(FigurePlan("iou.png", "IoU per class, last validation",
                                lambda path: figures.plot_bars(iou.tolist(), _named(names, len(iou)), "Validation IoU per class",
                                                               "IoU", path)))
    if masks is not None:
        plans.append(FigurePlan("masks.png", "Validation images: true and predicted masks",
                                lambda path: figures.plot_masks(masks.pictures, masks.truths, masks.predictions,
                                                                masks.palette, _named(names, len(masks.palette)),
                                                                masks.ignore_index, path)))
    roc = getattr(pl_module, "roc", None)
    if roc is not None:
        plans.append(FigurePlan("roc.png", "Verification ROC of the last validation",
                                lambda path: figures.plot_roc(roc[0].cpu().double().numpy(), roc[1].cpu().double().numpy(),
                                                              path, metrics.get("val/auc"))))
    embeddings, labels = getattr(pl_module, "val_embeddings", None), getattr(pl_module, "val_labels", None)
    if embeddings is not None and labels is not None:
        plans.append(FigurePlan("similarity.png", "Genuine and impostor pair similarities, last validation",
                                lambda path: figures.plot_similarity(*genuine_impostor_scores(embeddings, labels), path)))
    per_label = getattr(pl_module, "per_label", None)
    if per_label is not None:
        plans.append(FigurePlan("per_label.png", "Average precision per label, last validation",
                                lambda path: figures.plot_bars(per_label["ap"], per_label["label"],
                                                               "Validation AP per label", "average precision", path)))
    return plans


def _named(names: list[str], count: int) -> list[str]:
    """The task's class names, or the class indices when it has none."""
    return names if len(names) == count else [str(i) for i in range(count)]


def _draw_confusion(matrix: torch.Tensor, names: list[str], path: Path) -> None:
    from finetune.callbacks.media import normalized_rows
    from finetune.report import figures

    figures.plot_confusion_matrix(matrix.long().numpy(), normalized_rows(matrix).numpy(), names, path)


def mask_sample(batch: dict, predictions: torch.Tensor, datamodule, pl_module, count: int) -> MaskSample:
    """The first `count` images of a segmentation batch, on the host, ready to draw."""
    from finetune.callbacks.media import to_uint8_images
    from finetune.callbacks.segmentation import palette_for

    n = min(count, len(batch["image"]))
    mean = getattr(datamodule, "mean", (0.0, 0.0, 0.0))
    std = getattr(datamodule, "std", (1.0, 1.0, 1.0))
    hparams = getattr(pl_module, "hparams", {})
    num_classes = hparams.get("num_classes") or len(pl_module.class_names)
    return MaskSample(
        pictures=to_uint8_images(batch["image"][:n], mean, std),
        truths=batch["mask"][:n].cpu().numpy(),
        predictions=predictions[:n].cpu().numpy(),
        palette=palette_for(datamodule, num_classes),
        ignore_index=int(hparams.get("ignore_index", 255)),
    )
