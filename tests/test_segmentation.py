"""DeepLabV3: shapes at both output strides, widths from feature_info, ignore_index, bad input."""

from __future__ import annotations

import pytest
import torch
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
    first_conv = next(m for m in task.head.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == task.backbone.feature_info.channels()[-1]


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_atrous_rates_follow_output_stride(output_stride, rates):
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, output_stride=output_stride)
    dilations = tuple(m.dilation[0] for m in task.head[0].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert dilations == rates
    custom = SegmentationTask(3, backbone="resnet18", pretrained=False, atrous_rates=(2, 4, 6))
    assert tuple(m.dilation[0] for m in custom.head[0].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) == (2, 4, 6)


def test_input_smaller_than_stride_is_a_clear_error():
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, output_stride=16).eval()
    with pytest.raises(ValueError, match="smaller than the output stride 16"):
        task(torch.randn(1, 3, 12, 64))


def test_aux_head_only_while_training_and_weights_the_loss():
    task = SegmentationTask(3, backbone="resnet18", pretrained=False, aux_loss_weight=0.5)
    images = torch.randn(2, 3, 64, 64)
    assert task.train().forward_with_aux(images)[1].shape == (2, 3, 64, 64)
    assert task.eval().forward_with_aux(images)[1] is None
    assert SegmentationTask(3, backbone="resnet18", pretrained=False, aux_loss_weight=0).aux_head is None


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
