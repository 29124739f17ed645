"""The gradient highway, measured: gradient norms per stage and block, and ‖∂L/∂x_l‖ / ‖∂L/∂x_L‖.

A residual block computes x_{l+1} = x_l + F(x_l), so ∂L/∂x_l = ∂L/∂x_L · (1 + ∂/∂x_l Σ F):
the gradient reaching an early block keeps a direct copy of the last one. `GradientFlow`
logs, every `every_n_steps` optimizer steps, for each block l (x_l = the block's input, x_L =
the last block's output, the features the head sees):

    grad_flow/input_grad_ratio/<block>   ‖∂L/∂x_l‖ / ‖∂L/∂x_L‖
    grad_flow/input_grad_norm/<block>    ‖∂L/∂x_l‖
    grad_flow/param_grad_norm/<block>    ‖∂L/∂θ‖ over the block's parameters
    grad_flow/param_grad_norm/<stage>    the same over a stage (layer1, stages.0, ...)
    grad_flow/output_grad_norm           ‖∂L/∂x_L‖
    grad_flow/first_to_last_ratio        the first block's ratio, one curve to watch

Under fp16 mixed precision the gradients are still loss-scaled at that point, so absolute
norms carry the scale; the ratios do not.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from lightning.pytorch import Callback
from torch import nn

# Block containers: timm ResNet/ResNeXt/Wide ResNet and the experiment nets keep their blocks
# in `layer1..4` Sequentials, timm ResNetV2 in `stages.N.blocks`, ViT-style models in `blocks`.
_CONTAINER = re.compile(r"(?:^|\.)(layer\d+|stages\.\d+\.blocks|blocks)$")
OUTPUT = "output"


def find_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) in forward order, named as in the backbone (`layer1.0`, `stages.0.blocks.2`)
    whatever attribute holds it (`backbone.`, `net.`); full paths only if short names collide."""
    found = []
    for path, container in module.named_modules():
        match = _CONTAINER.search(path)
        if isinstance(container, nn.Sequential) and match:
            found += [(f"{match.group(1)}.{child}", f"{path}.{child}", block) for child, block in container.named_children()]
    unique = len({short for short, _, _ in found}) == len(found)
    return [(short if unique else full, block) for short, full, block in found]


def stage_of(block_name: str) -> str:
    """`layer2.1` -> `layer2`; `stages.1.blocks.0` -> `stages.1`."""
    return block_name.rsplit(".", 1)[0].removesuffix(".blocks")


class ActivationGradients:
    """Forward hooks that keep ‖∂L/∂x_l‖ of every block input (and of the last block's output)
    from the next backward pass. Remove it when done: no hook stays behind to cost anything."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.norms: dict[str, torch.Tensor] = {}
        last = len(blocks) - 1
        self._handles = [
            block.register_forward_hook(partial(self._on_forward, name, index == last))
            for index, (name, block) in enumerate(blocks)
        ]

    def _on_forward(self, name: str, is_last: bool, module, args, output) -> None:
        x = args[0] if args else None
        # A frozen stem gives a first input that needs no gradient: nothing to measure there.
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(partial(self._store, name))
        if is_last and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._store, OUTPUT))

    def _store(self, name: str, grad: torch.Tensor) -> None:
        self.norms[name] = grad.detach().float().norm()  # a tensor: no device sync inside backward

    def ratios(self) -> dict[str, float]:
        """‖∂L/∂x_l‖ / ‖∂L/∂x_L‖ per block that was measured."""
        reference = self.norms.get(OUTPUT)
        if reference is None:
            return {}
        return {name: float(norm / reference) for name, norm in self.norms.items() if name != OUTPUT}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def measure_gradient_flow(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn=None) -> dict[str, float]:
    """One forward/backward of `model` on a batch: ‖∂L/∂x_l‖ / ‖∂L/∂x_L‖ for every block, in order.

    Parameter gradients are left in `.grad`; call `model.zero_grad()` before training on.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no blocks found (layerN, stages.N.blocks or blocks Sequentials)")
    probe = ActivationGradients(blocks)
    try:
        loss = (loss_fn or nn.functional.cross_entropy)(model(images), labels)
        loss.backward()
    finally:
        probe.remove()
    ratios = probe.ratios()
    return {name: ratios[name] for name, _ in blocks if name in ratios}


def _norm(params) -> torch.Tensor | None:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


class GradientFlow(Callback):
    """Logs gradient norms per stage and block and the activation-gradient ratios above, on
    every `every_n_steps`-th optimizer step (step 0 included: the network at init).

    Works on any module whose blocks sit in `layerN`, `stages.N.blocks` or `blocks` Sequentials.
    Hooks exist only during a sampled step. `history` keeps every sample, for plots without a logger.
    """

    def __init__(self, every_n_steps: int = 50, prefix: str = "grad_flow"):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._blocks: list[tuple[str, nn.Module]] | None = None
        self._probe: ActivationGradients | None = None
        self._activations: dict[str, float] | None = None  # of the sampled step, until its optimizer step
        self._sampled_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        self._blocks = find_blocks(pl_module)
        if not self._blocks:
            raise ValueError(f"GradientFlow: {type(pl_module).__name__} has no layerN, stages.N.blocks or blocks Sequentials")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        # Once per optimizer step: under gradient accumulation every micro-batch has the same step.
        if step % self.every_n_steps or step == self._sampled_step:
            return
        self._sampled_step = step
        self._probe = ActivationGradients(self._blocks)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._probe is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: gradients of the scaled loss
            self._activations = self._activation_metrics(1.0 / scaler.get_scale() if scaler is not None else 1.0)
            self._remove_probe()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Parameter gradients here, not after backward: unscaled (fp16) and, for stages that
        # unfroze after DDP wrapped the model, averaged over the ranks (FinetuneTask.optimizer_step).
        if self._activations is None:
            return
        metrics = {**self._parameter_metrics(), **self._activations}
        self._activations = None
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _parameter_metrics(self) -> dict[str, float]:
        p = self.prefix
        metrics: dict[str, float] = {}
        stage_squares: dict[str, float] = {}
        for name, block in self._blocks:
            norm = _norm(block.parameters())
            if norm is not None:
                metrics[f"{p}/param_grad_norm/{name}"] = norm.item()
                stage = stage_of(name)
                stage_squares[stage] = stage_squares.get(stage, 0.0) + norm.item() ** 2
        metrics.update({f"{p}/param_grad_norm/{stage}": total ** 0.5 for stage, total in stage_squares.items()})
        return metrics

    def _activation_metrics(self, unscale: float) -> dict[str, float]:
        p = self.prefix
        metrics: dict[str, float] = {}
        norms = self._probe.norms
        if OUTPUT in norms:
            metrics[f"{p}/output_grad_norm"] = norms[OUTPUT].item() * unscale
        ratios = self._probe.ratios()
        for name, _ in self._blocks:
            if name in norms:
                metrics[f"{p}/input_grad_norm/{name}"] = norms[name].item() * unscale
            if name in ratios:
                metrics[f"{p}/input_grad_ratio/{name}"] = ratios[name]
        first = next((ratios[name] for name, _ in self._blocks if name in ratios), None)
        if first is not None:
            metrics[f"{p}/first_to_last_ratio"] = first
        return metrics

    def _remove_probe(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    # A sampled step that never reached backward (skipped batch, exception) must not leave hooks.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remove_probe()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_probe()
