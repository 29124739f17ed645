"""GradientFlow: the gradient highway measured, logged for every block, and free when not sampling."""

from __future__ import annotations

import math

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from experiments.degradation import CifarNet, LitNet
from finetune.callbacks import GradientFlow
from finetune.callbacks.gradient_flow import (
    find_blocks,
    measure_gradient_flow,
    stage_of,
)
from finetune.tasks import ClassificationTask


def first_block_ratio(depth: int, residual: bool) -> dict[str, float]:
    torch.manual_seed(0)
    net = CifarNet(depth, residual).train()
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    return measure_gradient_flow(net, images, labels)


def test_identity_shortcut_keeps_the_early_gradient_in_scale_at_depth_56():
    plain, residual = first_block_ratio(56, False), first_block_ratio(56, True)
    assert list(plain) == list(residual) and len(plain) == 27  # 3 stages x 9 blocks
    plain_first, residual_first = next(iter(plain.values())), next(iter(residual.values()))
    # ‖∂L/∂x_1‖ / ‖∂L/∂x_L‖: the residual net's stays within ~an order of magnitude of 1 at
    # every block; the plain BatchNorm net's runs away geometrically (it explodes here rather
    # than vanishes, but either way it is orders of magnitude off).
    assert all(0.1 < r < 100 for r in residual.values()), residual
    assert abs(math.log10(plain_first)) > abs(math.log10(residual_first)) + 1.5, (plain_first, residual_first)


def test_depth_multiplies_the_plain_nets_ratio_but_not_the_residual_nets():
    growth = {
        residual: next(iter(first_block_ratio(56, residual).values())) / next(iter(first_block_ratio(20, residual).values()))
        for residual in (False, True)
    }
    assert growth[False] > 20 and growth[True] < 10, growth


def test_find_blocks_names_timm_stages():
    resnet = [name for name, _ in find_blocks(timm.create_model("resnet18", pretrained=False))]
    assert resnet == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    v2 = [name for name, _ in find_blocks(timm.create_model("resnetv2_50", pretrained=False))]
    assert v2[:2] == ["stages.0.blocks.0", "stages.0.blocks.1"] and len(v2) == 16
    assert stage_of(v2[-1]) == "stages.3" and stage_of("layer2.1") == "layer2"
    # Two backbones in one module: short names would collide, so full paths.
    pair = torch.nn.ModuleDict({"a": CifarNet(8, True), "b": CifarNet(8, True)})
    assert [name for name, _ in find_blocks(pair)][:1] == ["a.layer1.0"]


class DictImages(Dataset):
    """Random images in the batch format of the product's tasks."""

    def __init__(self, count: int = 24, size: int = 32):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name = "recording"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def _trainer(callbacks, logger=False, steps: int = 5) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, logger=logger, callbacks=callbacks, accelerator="cpu", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )


def test_logs_every_block_and_stage_of_a_timm_resnet_to_the_logger():
    task = ClassificationTask(num_classes=3, backbone="resnet18", pretrained=False, optimizer="sgd", lr=0.01)
    logger, flow = RecordingLogger(), GradientFlow(every_n_steps=2)
    _trainer([flow], logger).fit(task, DataLoader(DictImages(), batch_size=8))
    logged = [(step, m) for step, m in logger.calls if any(k.startswith("grad_flow/") for k in m)]
    assert [step for step, _ in logged] == [0, 2, 4]
    blocks = [name for name, _ in find_blocks(task)]
    for _, metrics in logged:
        for block in blocks:
            for kind in ("input_grad_ratio", "input_grad_norm", "param_grad_norm"):
                assert math.isfinite(metrics[f"grad_flow/{kind}/{block}"]), (kind, block)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            assert metrics[f"grad_flow/param_grad_norm/{stage}"] > 0
        assert metrics["grad_flow/first_to_last_ratio"] == metrics["grad_flow/input_grad_ratio/layer1.0"]
        assert metrics["grad_flow/output_grad_norm"] > 0
    assert [h["step"] for h in flow.history] == [0, 2, 4]


class HookCounter(Callback):
    """After GradientFlow's batch start: how many forward hooks the forward pass will run."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts[trainer.global_step] = sum(len(m._forward_hooks) for m in pl_module.modules())


def test_hooks_exist_only_on_sampled_steps():
    module = LitNet(14, residual=True)
    flow, counter = GradientFlow(every_n_steps=3), HookCounter()
    data = TensorDataset(torch.randn(56, 1, 16, 16), torch.randint(0, 10, (56,)))
    _trainer([flow, counter], steps=7).fit(module, DataLoader(data, batch_size=8))
    blocks = len(find_blocks(module))
    assert counter.counts == {step: blocks if step % 3 == 0 else 0 for step in range(7)}
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0  # nothing left behind


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientFlow(every_n_steps=0)
