"""DeepLabV3: shapes at both output strides, widths from feature_info, ignore_index, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.tasks import SegmentationTask


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])  # 512 and 2048 channels at layer4
@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_match_input_size_for_odd_sizes(backbone, output_stride):
    task = SegmentationTask(4, backbone=backbone, pretrained=False, output_stride=output_stride).eval()
    with torch.no_grad():
        logits = task(torch.randn(2, 3, 67, 45))
    assert logits.shape == (2, 4, 67, 45)
    assert torch.isfinite(logits).all()
    assert task.backbone.feature_info.reduction()[-1] == output_stride
    first_conv = next(m for m in task.net.head.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == task.backbone.feature_info.channels()[-1]


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_atrous_rates_follow_output_stride(output_stride, rates):
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, output_stride=output_stride)
    dilations = tuple(m.dilation[0] for m in task.net.head[0].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert dilations == rates
    custom = SegmentationTask(3, backbone="resnet18", pretrained=False, atrous_rates=(2, 4, 6))
    assert tuple(m.dilation[0] for m in custom.net.head[0].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) == (2, 4, 6)


def test_input_smaller_than_stride_is_a_clear_error():
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, output_stride=16).eval()
    with pytest.raises(ValueError, match="smaller than the output stride 16"):
        task(torch.randn(1, 3, 12, 64))


def test_aux_head_only_while_training_and_weights_the_loss():
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, aux_loss_weight=0.5)
    images = torch.randn(2, 3, 64, 64)
    assert task.train().net.forward_with_aux(images)[1].shape == (2, 3, 64, 64)
    assert task.eval().net.forward_with_aux(images)[1] is None
    assert SegmentationTask(3, backbone="resnet18", pretrained=False, aux_loss_weight=0).net.aux_head is None


def test_ignored_pixels_count_in_neither_loss_nor_metrics():
    task = SegmentationTask(3, backbone="resnet18", pretrained=False)
    masks = torch.randint(0, 3, (2, 16, 16))
    masks[:, :, :8] = 255  # left half ignored
    logits = torch.randn(2, 3, 16, 16)
    other = logits.clone()
    other[:, :, :, :8] = torch.randn(2, 3, 16, 8) * 10  # change predictions only where ignored
    assert torch.equal(task._loss(logits, masks), task._loss(other, masks))
    first, second = task.val_miou.clone(), task.val_miou.clone()
    first.update(logits, masks)
    second.update(other, masks)
    assert torch.equal(first.compute(), second.compute())


def test_test_time_flip_and_scales_average_views():
    torch.manual_seed(0)
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, tta_flip=True, tta_scales=[0.75, 1.0]).eval()
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        probs = task.net.probabilities(images)
        views = [
            F.interpolate(task(F.interpolate(images, scale_factor=s, mode="bilinear") if s != 1 else images)
                          .softmax(1), size=(64, 48), mode="bilinear")
            for s in (0.75, 1.0)
        ]
        flipped = [
            F.interpolate(task((F.interpolate(images, scale_factor=s, mode="bilinear") if s != 1 else images).flip(-1))
                          .softmax(1).flip(-1), size=(64, 48), mode="bilinear")
            for s in (0.75, 1.0)
        ]
    assert probs.shape == (1, 3, 64, 48)
    torch.testing.assert_close(probs, sum(views + flipped) / 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 64, 48))


def test_short_training_beats_the_best_constant_predictor(shapes_folder):
    import lightning as L

    from finetune.data import SegmentationFolderDataModule

    L.seed_everything(0)
    dm = SegmentationFolderDataModule(str(shapes_folder), backbone="resnet18", crop_size=48, scale=(0.75, 1.25),
                                      batch_size=8, num_workers=0)
    task = SegmentationTask(dm.num_classes, backbone="resnet18", pretrained=False, class_names=dm.class_names,
                            output_stride=8, optimizer="adamw", lr=3e-3, scheduler="poly")
    trainer = L.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, dm)
    # Best constant prediction is "background everywhere": IoU of background, 0 for the others.
    masks = torch.cat([b["mask"].flatten() for b in dm.val_dataloader()])
    masks = masks[masks != 255]
    constant_miou = (masks == 0).float().mean().item() / dm.num_classes
    miou = trainer.callback_metrics["val/miou"].item()
    assert miou > constant_miou + 0.3, (miou, constant_miou)
