"""Segmentation outputs for people: W&B mask overlays and IoU table."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import Callback

from finetune.callbacks.media import _wandb_logger, say_where_pictures_go, to_uint8_images
from finetune.data.segmentation_classes import default_palette


def palette_for(datamodule, num_classes: int) -> list[tuple[int, int, int]]:
    """The data's class colours (classes.yaml, else its default palette)."""
    colors = getattr(datamodule, "class_colors", None)
    return [tuple(c) for c in colors] if colors else default_palette(num_classes)


class WandbMaskLogger(Callback):
    """Each validation: `num_images` images with predicted and true masks as W&B mask layers
    (toggle them in the panel), and a table of per-class IoU. Without a WandbLogger it says so
    once (RunReport has the pictures)."""

    def __init__(self, num_images: int = 8):
        self.num_images = num_images

    def setup(self, trainer, pl_module, stage: str) -> None:
        say_where_pictures_go(self, trainer)

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
