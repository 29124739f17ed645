"""Batches on their way to the device: no per-step host-to-device constants, channels_last
applied to the uint8 batch, ASPP that keeps channels_last, uint8 masks widened on the device,
and DataLoader workers shared by the processes of a node."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch

import finetune.data.normalize as normalize
from finetune.cli import create_cli
from finetune.data import SegmentationFolderDataModule
from finetune.data.classification import ImageFolderDataModule
from finetune.data.sampling import _log_once
from finetune.heads.segmentation import DeepLabV3Head
from finetune.speed import apply_speed_settings
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.segmentation import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
CL = torch.channels_last


def colours(colour_folder, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        str(colour_folder), backbone="resnet18", image_size=24, batch_size=16, **{"num_workers": 0, **kwargs}
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


# --- normalisation -----------------------------------------------------------------------------

def test_normalising_a_batch_builds_no_tensor_from_host_values(colour_folder, monkeypatch):
    dm = colours(colour_folder)
    images = next(iter(dm.val_dataloader()))["image"]
    # the formula before the constants were kept, built for each batch
    scale = torch.tensor([1.0 / (255.0 * s) for s in dm.std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(dm.mean, dm.std)]).view(1, -1, 1, 1)
    expected = images.float().mul_(scale).sub_(shift)
    dm.on_after_batch_transfer({"image": images.clone()}, 0)  # the first batch may build them
    built, tensor = [], torch.tensor
    with monkeypatch.context() as patch:
        patch.setattr(torch, "tensor", lambda *args, **kwargs: built.append(args) or tensor(*args, **kwargs))
        normalised = dm.on_after_batch_transfer({"image": images.clone()}, 0)["image"]
    assert not built, "a constant was copied to the device for this batch"
    assert normalised.dtype == torch.float32 and torch.equal(normalised, expected)
    mean, std = torch.tensor(dm.mean).view(1, -1, 1, 1), torch.tensor(dm.std).view(1, -1, 1, 1)
    torch.testing.assert_close(normalised, (images / 255.0 - mean) / std)


def test_normalising_keeps_channels_last():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = normalize.normalize_images(images.contiguous(memory_format=CL), mean, std)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    assert torch.equal(out, normalize.normalize_images(images, mean, std))


# --- channels_last -----------------------------------------------------------------------------

def test_channels_last_converts_the_uint8_batch_before_normalising(colour_folder, tmp_path, monkeypatch):
    dm = colours(colour_folder)
    batch = next(iter(dm.val_dataloader()))
    reference = dm.on_after_batch_transfer({"image": batch["image"].clone()}, 0)["image"]
    task = ClassificationTask(
        num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", pretrained=False
    )
    apply_speed_settings(task, channels_last=True, datamodule=dm)
    assert dm.channels_last
    normalised = dm.on_after_batch_transfer({"image": batch["image"].clone()}, 0)["image"]
    assert normalised.is_contiguous(memory_format=CL) and not normalised.is_contiguous()
    assert torch.equal(normalised, reference)

    seen = []  # (dtype, channels_last) of what is normalised, in a run
    original = normalize.normalize_images

    def recording(images, *args):
        seen.append((images.dtype, images.is_contiguous(memory_format=CL)))
        return original(images, *args)

    monkeypatch.setattr(normalize, "normalize_images", recording)
    trainer(tmp_path, limit_train_batches=2, limit_val_batches=1).fit(task, dm)
    assert seen and set(seen) == {(torch.uint8, True)}


def test_cli_tells_the_datamodule_about_channels_last(colour_folder, tmp_path):
    cli = create_cli([
        "validate", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.pretrained", "false",
        "--data.root", str(colour_folder), "--data.image_size", "24", "--data.num_workers", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--channels_last", "true",
    ])
    assert cli.datamodule.channels_last


# --- ASPP --------------------------------------------------------------------------------------

def test_aspp_and_head_keep_channels_last_with_the_same_values():
    torch.manual_seed(0)
    head = DeepLabV3Head(16, 3, rates=(1, 2, 3), channels=8).eval()
    aspp = head[0]
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        reference_aspp, reference = aspp(x), head(x)
        assert not aspp.branches[-1](x).is_contiguous(memory_format=CL)  # NCHW stays as it was
        # channels_last input, NCHW weights: the concatenation decides the output's layout
        assert aspp(x.contiguous(memory_format=CL)).is_contiguous(memory_format=CL)
        concatenated = []
        aspp.project.register_forward_pre_hook(lambda module, args: concatenated.append(args[0]))
        head.to(memory_format=CL)
        out_aspp, out = aspp(x.contiguous(memory_format=CL)), head(x.contiguous(memory_format=CL))
    assert concatenated[0].is_contiguous(memory_format=CL)  # so the 1x1 projection needs no layout change
    assert out_aspp.is_contiguous(memory_format=CL) and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out_aspp, reference_aspp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


# --- masks -------------------------------------------------------------------------------------

class RecordingMasks(SegmentationTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch["mask"].clone())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch["mask"].clone())
        return super().validation_step(batch, batch_idx)


def test_masks_travel_as_uint8_and_reach_the_steps_as_int64(shapes_folder, tmp_path):
    dm = SegmentationFolderDataModule(
        str(shapes_folder), backbone="resnet18", crop_size=32, batch_size=4, num_workers=0
    )
    loaded = [batch["mask"] for batch in dm.val_dataloader()]
    assert {mask.dtype for mask in loaded} == {torch.uint8}
    assert dm.train_dataloader().dataset[(0, 0)]["mask"].dtype == torch.uint8
    task = RecordingMasks(dm.num_classes, backbone="resnet18", pretrained=False, class_names=dm.class_names)
    fit = trainer(tmp_path, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    fit.fit(task, dm)
    fit.validate(task, dm)
    assert len(task.seen["train"]) == 2 and len(task.seen["val"]) == 4  # fit's validation, then validate's
    assert {mask.dtype for masks in task.seen.values() for mask in masks} == {torch.int64}
    for seen in (task.seen["val"][:2], task.seen["val"][2:]):
        assert all(torch.equal(got, want.long()) for got, want in zip(seen, loaded))
    train = torch.cat([mask.flatten() for mask in task.seen["train"]]).unique().tolist()
    assert set(train) <= {0, 1, 2, 255} and {1, 2} <= set(train)


# --- DataLoader workers ------------------------------------------------------------------------

@pytest.fixture
def sixteen_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    _log_once.cache_clear()
    return monkeypatch


def attached(dm, **trainer_kwargs):
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **trainer_kwargs)
    return dm


def test_default_workers_share_the_cpus_of_the_node(colour_folder, sixteen_cpus, caplog):
    dm = colours(colour_folder, num_workers=None)
    assert dm.num_workers == 8  # one process: 16 CPUs, at most 8
    attached(dm, devices=4, strategy="ddp")
    with caplog.at_level(logging.INFO, logger="finetune.data.sampling"):
        assert dm.val_dataloader().num_workers == 4 and dm.num_workers == 4
    messages = [r.getMessage() for r in caplog.records if "DataLoader workers" in r.getMessage()]
    assert messages == ["4 DataLoader workers per process: 16 CPUs / 4 processes on this node"]  # once
    sixteen_cpus.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert dm.num_workers == 1  # at least one


def test_torchrun_and_slurm_say_how_the_cpus_are_shared(colour_folder, sixteen_cpus):
    dm = attached(colours(colour_folder, num_workers=None), devices=4, strategy="ddp")
    sixteen_cpus.setenv("LOCAL_WORLD_SIZE", "8")
    assert dm.num_workers == 2
    sixteen_cpus.delenv("LOCAL_WORLD_SIZE")
    sixteen_cpus.setenv("SLURM_CPUS_PER_TASK", "6")  # this task's own CPUs: not divided
    assert dm.num_workers == 6
    sixteen_cpus.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert dm.num_workers == 4  # but no more than the process may use
    sixteen_cpus.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    sixteen_cpus.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun inside one SLURM task: its 6 CPUs shared
    assert dm.num_workers == 3


def test_explicit_num_workers_wins(colour_folder, sixteen_cpus):
    dm = attached(colours(colour_folder, num_workers=3), devices=4, strategy="ddp")
    sixteen_cpus.setenv("LOCAL_WORLD_SIZE", "8")
    assert dm.num_workers == 3 and dm.val_dataloader().num_workers == 3
    dm.num_workers = 0
    assert dm.val_dataloader().num_workers == 0
