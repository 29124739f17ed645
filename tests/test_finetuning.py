"""Freeze/unfreeze schedules: frozen means untouched, unfrozen means learning, resume and
schedulers see one constant optimizer, and stages come from each backbone's own grouping."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from finetune.backbones import SUPPORTED_BACKBONES, create_backbone
from finetune.data import ImageFolderDataModule
from finetune.finetuning import backbone_stages
from finetune.tasks import ClassificationTask

RESNET_STAGES = ["layer4", "layer3", "layer2", "stem+layer1"]


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_stages_partition_every_backbone(name):
    backbone = create_backbone(name)
    stages = backbone_stages(backbone)
    expected = ["stages.3", "stages.2", "stages.1", "stem+stages.0"] if name.startswith("resnetv2") else RESNET_STAGES
    assert [s.name for s in stages] == expected
    ids = [id(p) for s in stages for p in s.params]
    assert len(ids) == len(set(ids)) == len(list(backbone.parameters()))
    norms = [id(m) for s in stages for m in s.norms(backbone)]
    assert len(norms) == len(set(norms)) == sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


def make(colour_folder, finetuning: dict | None, **task_kwargs):
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(
        num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False,
        **{"lr": 3e-3, "finetuning": finetuning, **task_kwargs},
    )
    return dm, task


def trainer(max_epochs: int, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=max_epochs)
    return L.Trainer(**{**defaults, **kwargs})


def snapshot(task) -> dict[str, torch.Tensor]:
    """The network's tensors, by name (`backbone.*`, `head.*`)."""
    return {k: v.clone() for k, v in task.net.state_dict().items()}


def changed(before: dict, task, prefix: str) -> set[str]:
    after = task.net.state_dict()
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_frozen_backbone_is_bit_identical_and_bn_statistics_untouched(colour_folder):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "frozen"})  # train_bn defaults to false here
    before = snapshot(task)
    trainer(2).fit(task, dm)
    assert not changed(before, task, "backbone.")  # weights and BN running statistics
    assert changed(before, task, "head.")
    head_params = sum(p.numel() for p in task.net.head.parameters())
    assert task.trainer.callback_metrics["train/trainable_params"] == head_params


def test_gradual_unfreezes_one_stage_per_epoch(colour_folder, tmp_path):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "gradual", "unfreeze_at": [1, 2, 3, 4], "train_bn": False})
    before = snapshot(task)
    logger = CSVLogger(tmp_path)
    fit = trainer(2, log_every_n_steps=1, logger=logger)  # LRs are logged on the steps the logger writes
    fit.fit(task, dm)  # epoch 0: head only; epoch 1: + layer4
    assert changed(before, task, "backbone.layer4.")
    for frozen in ("backbone.layer3.", "backbone.layer2.", "backbone.layer1.", "backbone.conv1.", "backbone.bn1."):
        assert not changed(before, task, frozen), frozen
    assert fit.logged_metrics["lr/layer4"] > 0 and fit.logged_metrics["lr/layer3"] == 0
    logger.save()
    first = next(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))  # epoch 0: the head alone
    assert float(first["lr/head"]) > 0 and float(first["lr/layer4"]) == 0
    task.train()  # what Lightning or a user may call: frozen BatchNorm must stay in eval mode
    assert task.backbone.layer3[0].bn1.training is False and task.backbone.layer4[0].bn1.training is True


class SyncBatchNormAsDDPDoes(Callback):
    """`--trainer.sync_batchnorm true`: DDPStrategy.setup replaces every BatchNorm by a new
    SyncBatchNorm (Lightning's TorchSyncBatchNorm) after the task was built and set up. DDP
    refuses SyncBatchNorm on CPU, so convert the same way at fit start (one process: it then
    normalises like BatchNorm), and record, per training batch, how many norms train."""

    def __init__(self):
        self.training_norms: dict[int, set[int]] = {}

    def on_fit_start(self, trainer, pl_module):
        TorchSyncBatchNorm().apply(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        norms = [m for m in pl_module.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 20 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
        self.training_norms.setdefault(trainer.current_epoch, set()).add(sum(m.training for m in norms))


def test_frozen_sync_batchnorm_stays_in_eval_mode(colour_folder):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "frozen"})  # train_bn false: a linear probe
    before = snapshot(task)
    converted = SyncBatchNormAsDDPDoes()
    trainer(2, limit_train_batches=2, limit_val_batches=1, callbacks=[converted]).fit(task, dm)
    assert converted.training_norms == {0: {0}, 1: {0}}
    assert not changed(before, task, "backbone.")  # running statistics untouched
    task.train()  # Lightning's or a user's: the norms that run now must stay in eval mode too
    assert not any(m.training for m in task.backbone.modules() if isinstance(m, nn.SyncBatchNorm))


def test_sync_batchnorm_trains_from_its_unfreeze_epoch(colour_folder):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "freeze_then_unfreeze", "unfreeze_at": [1], "train_bn": False})
    converted = SyncBatchNormAsDDPDoes()
    fit = trainer(2, limit_train_batches=2, limit_val_batches=1, callbacks=[converted])
    fit.fit(task, dm)
    assert converted.training_norms == {0: {0}, 1: {20}}
    before = snapshot(task)
    task.train()
    task(dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)["image"])  # the norms now running learn
    assert "backbone.layer1.0.bn1.running_mean" in changed(before, task, "backbone.")


def test_train_bn_keeps_frozen_batchnorm_learning(colour_folder):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "frozen", "train_bn": True})
    before = snapshot(task)
    trainer(1).fit(task, dm)
    moved = changed(before, task, "backbone.")
    assert "backbone.layer1.0.bn1.running_mean" in moved and "backbone.layer1.0.bn1.weight" in moved
    assert not any(k.endswith("conv1.weight") for k in moved)


def test_train_bn_default_depends_on_strategy(colour_folder):
    assert make(colour_folder, {"strategy": "frozen"})[1].finetuning["train_bn"] is False
    assert make(colour_folder, {"strategy": "gradual"})[1].finetuning["train_bn"] is True
    assert make(colour_folder, {"strategy": "gradual", "train_bn": False})[1].finetuning["train_bn"] is False


def test_discriminative_learning_rates(colour_folder):
    _, task = make(colour_folder, {"strategy": "none", "lr_decay": 0.5}, lr=0.01)
    lrs = {g["name"]: g["lr"] for g in task.param_groups()}
    assert lrs["head"] == 0.01 and lrs["layer4"] == 0.005 and lrs["layer3"] == 0.0025
    assert lrs["stem+layer1"] == lrs["stem+layer1_no_decay"] == 0.01 * 0.5**4
    decay = {g["name"]: g["weight_decay"] for g in task.param_groups()}
    assert decay["layer4"] > 0 and decay["layer4_no_decay"] == 0  # no decay on norms and biases
    _, task = make(colour_folder, {"lr_mult": [1.0, 0.1, 0.1, 0.01]}, lr=0.01)
    assert {g["name"]: g["lr"] for g in task.param_groups()}["layer3"] == pytest.approx(0.001)


def test_bad_schedule_is_a_one_line_error(colour_folder):
    with pytest.raises(ValueError, match=r"unfreeze_at: 2 epochs for 4 stages \(layer4, layer3, layer2, stem\+layer1\)"):
        make(colour_folder, {"strategy": "gradual", "unfreeze_at": [1, 2]})


@pytest.mark.parametrize("scheduler", ["cosine", "constant", "onecycle", "plateau"])
def test_every_scheduler_steps_across_unfreeze_points(colour_folder, scheduler):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "gradual", "unfreeze_at": [1, 1, 2, 2], "lr_decay": 0.5},
                    scheduler=scheduler)
    before = snapshot(task)
    fit = trainer(3)
    fit.fit(task, dm)
    assert changed(before, task, "backbone.conv1.")  # the last stage unfroze and trained
    groups = {g["name"]: g["lr"] for g in fit.optimizers[0].param_groups}
    assert groups["layer4"] == pytest.approx(groups["head"] * 0.5)  # multipliers survive it


def fit_and_keep_checkpoints(colour_folder, folder, epochs, ckpt_path=None):
    L.seed_everything(0)
    dm, task = make(colour_folder, {"strategy": "gradual", "unfreeze_at": [1, 2, 3, 4], "lr_decay": 0.5})
    every_epoch = ModelCheckpoint(dirpath=folder, filename="epoch{epoch}", save_top_k=-1, auto_insert_metric_name=False)
    run = trainer(epochs, enable_checkpointing=True, callbacks=[every_epoch])
    run.fit(task, dm, ckpt_path=ckpt_path)
    lrs = [g["lr"] for g in run.optimizers[0].param_groups]
    return task, lrs


def test_resume_before_and_after_unfreeze_matches_uninterrupted_run(colour_folder, tmp_path):
    full, full_lrs = fit_and_keep_checkpoints(colour_folder, tmp_path / "full", 3)
    saved = {e: torch.load(tmp_path / "full" / f"epoch{e}.ckpt", weights_only=True) for e in (0, 2)}
    names = [[g["name"] for g in s["optimizer_states"][0]["param_groups"]] for s in saved.values()]
    assert names[0] == names[1]  # the optimizer has the same groups before and after unfreezing
    for epoch in (0, 1):  # saved before layer4 unfroze (epoch 1), and after
        resumed, lrs = fit_and_keep_checkpoints(
            colour_folder, tmp_path / f"from{epoch}", 3, ckpt_path=tmp_path / "full" / f"epoch{epoch}.ckpt"
        )
        assert resumed.trainable_stages == full.trainable_stages == 2
        assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in full.parameters()]
        assert lrs == pytest.approx(full_lrs)
        for name, tensor in full.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=f"resumed after epoch {epoch}: {name}")
