"""Margin heads against hand-computed values, label dtypes, unit-norm embeddings, identity split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.heads.embedding import MarginHead, arcface_target, cosface_target


def head_with_known_angles(kind: str, **kwargs) -> tuple[MarginHead, torch.Tensor, torch.Tensor]:
    """2-D embeddings and class centres at known angles, so cos(theta) is exact."""
    head = MarginHead(2, 3, kind, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).repeat_interleave(head.subcenters, 0))
    angle = math.radians(30)
    embeddings = torch.tensor([[math.cos(angle), math.sin(angle)]]) * 5  # norm must not matter
    return head, embeddings, torch.tensor([0])


def test_arcface_target_logit_is_s_cos_theta_plus_m():
    head, embeddings, labels = head_with_known_angles("arcface", scale=64.0, margin=0.5)
    logits = head(embeddings, labels)
    theta = math.radians(30)
    assert logits[0, 0].item() == pytest.approx(64 * math.cos(theta + 0.5), abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(64 * math.cos(math.radians(60)), abs=1e-4)  # others: s*cos
    assert logits[0, 2].item() == pytest.approx(64 * math.cos(math.radians(150)), abs=1e-4)


def test_cosface_target_logit_is_s_times_cos_minus_m():
    head, embeddings, labels = head_with_known_angles("cosface", scale=30.0, margin=0.35)
    logits = head(embeddings, labels)
    assert logits[0, 0].item() == pytest.approx(30 * (math.cos(math.radians(30)) - 0.35), abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(30 * math.cos(math.radians(60)), abs=1e-4)


def test_subcenter_arcface_uses_the_nearest_subcentre():
    head, embeddings, labels = head_with_known_angles("subcenter_arcface", scale=64.0, margin=0.5, subcenters=2)
    with torch.no_grad():  # identity 0's second sub-centre at 20 degrees: 10 degrees from the embedding
        head.weight[1] = torch.tensor([math.cos(math.radians(20)), math.sin(math.radians(20))])
    logits = head(embeddings, labels)
    assert logits[0, 0].item() == pytest.approx(64 * math.cos(math.radians(10) + 0.5), abs=1e-3)
    assert head.weight.shape == (6, 2)


def test_margin_is_stable_and_monotonic_at_theta_zero_and_pi():
    cos = torch.tensor([1.0, -1.0, 0.999999, -0.999999, 0.0], requires_grad=True)
    target = arcface_target(cos, 0.5)
    target.sum().backward()
    assert torch.isfinite(target).all() and torch.isfinite(cos.grad).all()
    grid = torch.linspace(-1, 1, 2001)
    values = arcface_target(grid, 0.5)
    assert (values[1:] >= values[:-1] - 1e-6).all()  # a larger cos (smaller angle) never scores less
    assert torch.equal(cosface_target(grid, 0.35), grid - 0.35)


def test_label_dtypes_give_the_same_loss_and_fractions_fail():
    torch.manual_seed(0)
    head = MarginHead(8, 5)
    embeddings = torch.randn(4, 8)
    labels = torch.tensor([0, 3, 1, 4])
    reference = F.cross_entropy(head(embeddings, labels), labels)
    for dtype in (torch.int32, torch.int16, torch.float32):
        converted = labels.to(dtype)
        assert torch.equal(F.cross_entropy(head(embeddings, converted), labels), reference), dtype
    with pytest.raises(ValueError, match="whole numbers"):
        head(embeddings, torch.tensor([0.5, 1.0, 2.0, 3.0]))


def test_logits_stay_float32_under_bf16_autocast():
    head = MarginHead(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.randn(4, 8).bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert logits.dtype == torch.float32


def test_embeddings_have_unit_norm_and_margin_weights_are_in_the_optimizer():
    from finetune.tasks import EmbeddingTask

    task = EmbeddingTask(7, backbone="resnet18", pretrained=False, embedding_dim=32).eval()
    embeddings = task(torch.randn(3, 3, 64, 64))
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    optimised = {id(p) for group in task.param_groups() for p in group["params"]}
    assert id(task.head.weight) in optimised and "head.weight" in task.state_dict()
