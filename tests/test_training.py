"""Real (tiny) training runs: it learns, it resumes where it stopped, checkpoints reload."""

from __future__ import annotations

import lightning as L
import torch

from finetune.data import ImageFolderDataModule
from finetune.tasks import ClassificationTask


def tiny_run(colour_folder, **trainer_kwargs):
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(
        num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", pretrained=False, lr=3e-3
    )
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(**{**defaults, **trainer_kwargs})
    return dm, task, trainer


def test_accuracy_rises_well_above_chance(colour_folder, tmp_path):
    L.seed_everything(0)
    dm, task, trainer = tiny_run(colour_folder, max_epochs=5, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.validate(task, dm, verbose=False)
    before = trainer.callback_metrics["val/acc"].item()
    trainer.fit(task, dm)
    after = trainer.callback_metrics["val/acc"].item()
    assert after >= 0.9, f"val/acc {after:.3f} (chance is 0.33)"
    assert after > before
    assert task.confusion_matrix.sum().item() == 24  # every val image counted once
    assert trainer.callback_metrics["train/loss_epoch"] < 1.0


def test_checkpoint_reloads_without_config_and_safely(colour_folder, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True)
    dm, task, trainer = tiny_run(colour_folder, max_epochs=1, callbacks=[checkpoint])
    trainer.fit(task, dm)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)  # no pickled objects inside
    assert raw["hyper_parameters"]["class_names"] == ["blue", "green", "red"]
    reloaded = ClassificationTask.load_from_checkpoint(tmp_path / "last.ckpt", map_location="cpu").eval()
    # loaders ship uint8; the DataModule normalises after the transfer, as Lightning calls it
    images = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)["image"]
    torch.testing.assert_close(reloaded(images), task.eval()(images))
