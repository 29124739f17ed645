"""DDP on 2 CPU processes (gloo) computes what 1 process computes with the same global batch
(weights, their EMA and the metrics validated on it), also across unfreeze points, where DDP alone would leave late-unfrozen stages unsynchronised;
evaluates exactly what 1 process does on data that does not divide by 2; and keeps replicas
identical when fp16's grad scaler skips a step on one of them."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import torch
from conftest import write_colour_images, write_shape_images
from launch import FixedBatchNormTask
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision

from finetune.callbacks import EMA
from finetune.data import ImageFolderDataModule, ManifestDataModule, SegmentationFolderDataModule
from finetune.tasks import ClassificationTask, MultiLabelClassificationTask, SegmentationTask


class RecordTrainable(Callback):
    """Each rank writes, per step, which parameters required grad."""

    def __init__(self, folder):
        self.folder = folder
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([n for n, p in pl_module.named_parameters() if p.requires_grad])

    def on_train_end(self, trainer, pl_module):
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
        # The trained weights themselves: the EMA callback after this one swaps in the average.
        torch.save(pl_module.state_dict(), self.folder / f"live{trainer.global_rank}.pt")


def fit(colour_folder, devices: int, batch_size: int, root):
    L.seed_everything(0)
    root.mkdir(parents=True)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=batch_size, num_workers=0)
    task = FixedBatchNormTask(
        num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False,
        # SGD keeps float-rounding differences proportional to the gradients; Adam divides
        # near-zero gradients by their own size and would amplify them.
        optimizer="sgd", lr=0.02,
        finetuning={"strategy": "gradual", "unfreeze_at": [1, 2, 3, 4], "lr_decay": 0.5},
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=[RecordTrainable(root), EMA(decay=0.9)],
    )
    trainer.fit(task, dm)
    trainable = [json.loads(p.read_text()) for p in sorted(root.glob("rank*.json"))]
    live = torch.load(root / "live0.pt", weights_only=True)
    # After fit the task holds the EMA of its weights (validated on it too).
    return {k: v.item() for k, v in trainer.callback_metrics.items()}, live, task.state_dict(), trainable


def test_two_ranks_match_one_process_across_unfreezing(colour_folder, tmp_path):
    single_metrics, single_weights, single_ema, (single_trainable,) = fit(colour_folder, 1, 16, tmp_path / "one")
    ddp_metrics, ddp_weights, ddp_ema, (rank0, rank1) = fit(colour_folder, 2, 8, tmp_path / "two")
    assert rank0 == rank1 == single_trainable  # same trainable set on every rank at every step
    assert any("net.backbone.layer3.0.conv1.weight" in step for step in rank0)  # unfreezing happened
    assert single_metrics["val/acc"] > 0.5  # it learned something (chance 0.33)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(ddp_ema[name], single_ema[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(single_ema["net.head.classifier.1.weight"], single_weights["net.head.classifier.1.weight"])
    for key in ("val/acc", "val/f1", "val/loss", "train/loss_epoch"):
        assert abs(ddp_metrics[key] - single_metrics[key]) < 1e-4, (key, ddp_metrics[key], single_metrics[key])


class InfOnOneRank(Callback):
    """Rank 1 alone gets an inf gradient in layer4, which unfreezes at epoch 1, after DDP
    wrapped the model (so DDP does not average it), on the first step of epoch 1. Every rank
    records what callbacks see of that gradient, and saves its final state."""

    def __init__(self, folder, at_step: int):
        self.folder, self.at_step = folder, at_step
        self.seen: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_rank == 1 and trainer.global_step == self.at_step:
            pl_module.backbone.layer4[0].conv1.weight.grad.view(-1)[0] = math.inf

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.backbone.layer4[0].conv1.weight.grad
        self.seen.append(float("nan") if grad is None else grad.float().sum().item())

    def on_train_end(self, trainer, pl_module):
        # Parameters: BatchNorm statistics differ by design after the last step (DDP broadcasts
        # rank 0's buffers at the start of each forward, each rank then updates its own).
        weights = {name: p.detach() for name, p in pl_module.named_parameters()}
        state = {"weights": weights, "scale": trainer.precision_plugin.scaler.get_scale(), "seen": self.seen}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_fp16_ranks_skip_an_inf_step_together_and_stay_identical(colour_folder, tmp_path):
    """With fp16 the AMP grad scaler checks each rank's gradients for inf/NaN before stepping.
    Gradients of late-unfrozen stages are averaged by the task, so that must happen before
    the check: otherwise rank 1 skips the step while rank 0 steps with inf weights."""
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=16, batch_size=8, num_workers=0)
    task = ClassificationTask(
        num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False, optimizer="sgd", lr=0.01,
        finetuning={"strategy": "gradual", "unfreeze_at": [1, 2, 3, 4]},
    )
    steps_per_epoch = 3  # 48 images, 2 ranks x 8
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow of its own at this scale
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],  # Lightning refuses "16-mixed" on CPU by name
        callbacks=[InfOnOneRank(tmp_path, at_step=steps_per_epoch)],
    )
    trainer.fit(task, dm)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["scale"] == rank1["scale"] == 2.0**7  # both skipped the injected step, only it
    seen0, seen1 = rank0["seen"], rank1["seen"]
    assert len(seen0) == 2 * steps_per_epoch and math.isinf(seen0[steps_per_epoch])  # callbacks saw the average
    torch.testing.assert_close(torch.tensor(seen0), torch.tensor(seen1), equal_nan=True)
    for name, tensor in rank0["weights"].items():
        assert torch.isfinite(tensor.float()).all(), name
        torch.testing.assert_close(rank1["weights"][name], tensor, rtol=0, atol=0, msg=name)


class KeepEvaluation(Callback):
    """Rank 0 saves the validation metrics and the per-class tensors only callbacks can see."""

    def __init__(self, path):
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            tensors = {name: getattr(pl_module, name, None) for name in ("confusion_matrix", "per_class_iou")}
            if hasattr(pl_module, "decision_thresholds"):  # multi-label: tuned on the whole validation
                tensors["thresholds"] = torch.tensor(pl_module.decision_thresholds)
            metrics = {k: v.cpu() for k, v in trainer.callback_metrics.items()}
            torch.save({**metrics, **{k: v for k, v in tensors.items() if v is not None}}, self.path)


def validate(task, dm, devices: int, path) -> dict[str, torch.Tensor]:
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[KeepEvaluation(path)],
    )
    trainer.validate(task, dm)
    return torch.load(path, weights_only=True)


def assert_same_evaluation(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_two_ranks_evaluate_exactly_what_one_process_does(tmp_path):
    """101 images on 2 ranks: the DistributedSampler pads rank 1 with a copy of image 0. It
    must count once in accuracy, F1, the confusion matrix, mIoU, per-class IoU and the loss."""
    root = tmp_path / "colours"
    write_colour_images(root / "train", 2, seed=0, size=16)
    write_colour_images(root / "val", 34, seed=1, size=16)
    (root / "val" / "red" / "red_033.png").unlink()  # 101 = 34 + 34 + 33
    dm = ImageFolderDataModule(str(root), backbone="resnet18", image_size=16, batch_size=16, num_workers=0)
    assert len(dm.splits.val) == 101
    L.seed_everything(0)
    task = ClassificationTask(num_classes=3, class_names=dm.class_names, backbone="resnet18", pretrained=False)
    one, two = (validate(task, dm, devices, tmp_path / f"classes{devices}.pt") for devices in (1, 2))
    assert one["confusion_matrix"].sum() == 101 and "val/f1" in one and "val/acc_class/red" in one
    assert_same_evaluation(one, two)

    shapes = tmp_path / "shapes"
    write_shape_images(shapes / "train", 2, seed=0, size=32)
    write_shape_images(shapes / "val", 9, seed=1, size=32)
    (shapes / "classes.yaml").write_text("- background\n- red\n- blue\n")
    dm = SegmentationFolderDataModule(str(shapes), backbone="resnet18", crop_size=32, batch_size=2, num_workers=0)
    L.seed_everything(0)
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, class_names=dm.class_names, aspp_channels=16)
    one, two = (validate(task, dm, devices, tmp_path / f"masks{devices}.pt") for devices in (1, 2))
    assert {"val/miou", "val/pixel_acc", "val/loss", "per_class_iou"} <= one.keys()
    assert_same_evaluation(one, two)


def test_two_ranks_evaluate_multi_label_exactly_what_one_process_does(tmp_path):
    """101 validation images on 2 ranks: mAP (macro and micro), F1, exact match, per-label AP and
    the thresholds tuned on them are those of one process (the padded copy counts once)."""
    from test_multilabel import write_colour_sets

    rows = write_colour_sets(tmp_path, 4, "train", seed=0, size=16) + write_colour_sets(tmp_path, 101, "val", seed=1, size=16)
    rows = [row if row[1] else [row[0], "red", row[2]] for row in rows]  # every row labelled: all 101 are kept
    (tmp_path / "labels.csv").write_text("path,labels,split\n" + "".join(",".join(row) + "\n" for row in rows))
    dm = ManifestDataModule(str(tmp_path / "labels.csv"), backbone="resnet18", image_size=16, crop="whole", batch_size=16,
                            num_workers=0, classes=["red", "green", "blue"])
    assert len(dm.splits.val) == 101 and dm.multilabel
    L.seed_everything(0)
    task = MultiLabelClassificationTask(3, "resnet18", pretrained=False, class_names=dm.class_names, tune_thresholds=True)
    fresh = copy.deepcopy(task)  # validating tunes the thresholds: each run starts from the same ones
    one, two = validate(task, dm, 1, tmp_path / "labels1.pt"), validate(fresh, dm, 2, tmp_path / "labels2.pt")
    assert {"val/map", "val/map_micro", "val/f1", "val/exact_match", "val/ap_class/red", "thresholds"} <= one.keys()
    assert_same_evaluation(one, two)
