"""Segmentation outputs for people: W&B mask overlays and IoU table; PNG masks from predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.callbacks.media import _wandb_logger, to_uint8_images
from finetune.callbacks.outputs import save_mask
from finetune.data.images import read_rgb
from finetune.data.segmentation_classes import default_palette


def palette_for(datamodule, num_classes: int) -> list[tuple[int, int, int]]:
    """The data's class colours (classes.yaml, else its default palette)."""
    colors = getattr(datamodule, "class_colors", None)
    return [tuple(c) for c in colors] if colors else default_palette(num_classes)


class WandbMaskLogger(Callback):
    """Each validation: `num_images` images with predicted and true masks as W&B mask layers
    (toggle them in the panel), and a table of per-class IoU. Does nothing without W&B."""

    def __init__(self, num_images: int = 8):
        self.num_images = num_images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        logger = _wandb_logger(trainer)
        if batch_idx != 0 or trainer.sanity_checking or logger is None or not trainer.is_global_zero:
            return
        import wandb

        dm = trainer.datamodule
        labels = dict(enumerate(pl_module.class_names))
        n = min(self.num_images, len(batch["image"]))
        pictures = to_uint8_images(batch["image"][:n], dm.mean, dm.std)
        images = [
            wandb.Image(picture, masks={
                "prediction": {"mask_data": pred.cpu().numpy().astype(np.uint8), "class_labels": labels},
                "ground_truth": {"mask_data": true.cpu().numpy().astype(np.uint8), "class_labels": labels},
            })
            for picture, pred, true in zip(pictures, outputs[:n], batch["mask"][:n])
        ]
        logger.experiment.log({"val/masks": images, "trainer/global_step": trainer.global_step})

    def on_validation_end(self, trainer, pl_module):
        logger = _wandb_logger(trainer)
        iou = getattr(pl_module, "per_class_iou", None)
        if logger is None or iou is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        table = wandb.Table(columns=["class", "IoU"], data=[[n, float(v)] for n, v in zip(pl_module.class_names, iou)])
        logger.experiment.log({"val/iou_per_class": table, "trainer/global_step": trainer.global_step})


class SegmentationMaskWriter(BasePredictionWriter):
    """`finetune predict`: `<output_dir>/masks/<stem>.png` (class index per pixel, at the
    image's own size) and `<output_dir>/overlays/<stem>.png` (colours over the image)."""

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        palette = palette_for(trainer.datamodule, pl_module.hparams.num_classes)
        for i, (path, mask) in enumerate(zip(prediction["path"], prediction["mask"].cpu().numpy())):
            height, width = read_rgb(path).shape[:2] if prediction.get("size") is None else prediction["size"][i]
            save_mask(out, path, mask[: int(height), : int(width)], palette)  # stride padding dropped
