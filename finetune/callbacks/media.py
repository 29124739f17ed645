"""Show a person what the model does: validation predictions and the confusion matrix in W&B
(multi-label: predicted label sets and a per-label table of AP, F1 and threshold)."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def _wandb_logger(trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def say_where_pictures_go(callback: Callback, trainer) -> None:
    """One line (rank 0) when a W&B picture callback has no WandbLogger to draw in: which
    logger(s) there are instead, and where the run report puts the pictures. Call it in
    `setup`, which Lightning runs once per fit or validate."""
    if _wandb_logger(trainer) is not None or not trainer.is_global_zero:
        return
    from finetune.callbacks.report import run_report_of

    name = type(callback).__name__
    names = ", ".join(type(lg).__name__ for lg in trainer.loggers)
    loggers = f"{names} cannot take W&B images" if names else "no logger is configured (trainer.logger: false)"
    report = run_report_of(trainer)
    where = (
        f"the pictures are in {report.folder(trainer)}/ (RunReport)" if report is not None
        else "turn the run report on (--report.enabled true) to get them as PNG files"
    )
    log.warning("%s: %s; %s", name, loggers, where)


def to_uint8_images(images: torch.Tensor, mean, std) -> list:
    """Undo Normalize so that the grid shows the picture the model saw."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1).mul(255).byte()
    return [p.permute(1, 2, 0).cpu().numpy() for p in pixels]


def confusion_table(matrix: torch.Tensor, class_names: list[str], normalize: bool = False):
    """The table behind `wandb.plot.confusion_matrix`, built from counts we already have.

    `normalize`: each true class's row as fractions of its images (its recall on the diagonal),
    so that with imbalanced classes a rare class's errors are as visible as a common one's."""
    import wandb

    values = normalized_rows(matrix) if normalize else matrix.long()
    rows = [
        [class_names[i], class_names[j], round(float(values[i, j]), 4) if normalize else int(values[i, j])]
        for i in range(len(class_names))
        for j in range(len(class_names))
    ]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
    return wandb.plot_table(
        "wandb/confusion_matrix/v1",
        table,
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": "Validation confusion matrix" + (", per true class" if normalize else "")},
    )


def normalized_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (a class without validation images: a row of zeros)."""
    matrix = matrix.double()
    return matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)


def label_set(multi_hot: list, names: list[str]) -> str:
    """`a+b` for the labels set in a multi-hot row; `-` for none."""
    return "+".join(name for name, on in zip(names, multi_hot) if on) or "-"


def per_label_table(columns: dict[str, list]):
    """A W&B table with a row per label (label, ap, f1, positives, threshold)."""
    import wandb

    names = list(columns)
    return wandb.Table(columns=names, data=[list(row) for row in zip(*columns.values())])


class WandbMediaLogger(Callback):
    """Each validation: a grid of `num_images` images captioned with true and predicted class,
    and the confusion matrix. Without a WandbLogger it says so once (RunReport has the pictures)."""

    def __init__(self, num_images: int = 16):
        self.num_images = num_images

    def setup(self, trainer, pl_module, stage: str) -> None:
        say_where_pictures_go(self, trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        logger = _wandb_logger(trainer)
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or logger is None:
            return
        if not trainer.is_global_zero or self.num_images <= 0:
            return
        n = min(self.num_images, len(batch["image"]))
        datamodule = trainer.datamodule
        mean = getattr(datamodule, "mean", (0.0, 0.0, 0.0))
        std = getattr(datamodule, "std", (1.0, 1.0, 1.0))
        names = pl_module.class_names
        truth, predicted = batch["label"][:n].tolist(), outputs[:n].tolist()
        if batch["label"].dim() == 2:  # multi-label: multi-hot targets, predicted label sets
            captions = [f"true: {label_set(t, names)} / pred: {label_set(p, names)}" for t, p in zip(truth, predicted)]
        else:
            captions = [f"true: {names[t]} / pred: {names[p]}" for t, p in zip(truth, predicted)]
        logger.log_image(
            "val/predictions", to_uint8_images(batch["image"][:n], mean, std), step=trainer.global_step, caption=captions
        )

    def on_validation_end(self, trainer, pl_module):
        # on_validation_end runs after the module's on_validation_epoch_end has computed the matrix.
        logger = _wandb_logger(trainer)
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        per_label = getattr(pl_module, "per_label", None)  # multi-label: AP, F1, threshold per label
        if per_label is not None:
            logger.experiment.log({"val/per_label": per_label_table(per_label), "trainer/global_step": trainer.global_step})
        matrix = getattr(pl_module, "confusion_matrix", None)
        if matrix is None:
            return
        names = pl_module.class_names
        logger.experiment.log({
            "val/confusion_matrix": confusion_table(matrix, names),
            "val/confusion_matrix_normalized": confusion_table(matrix, names, normalize=True),
            "trainer/global_step": trainer.global_step,
        })
