"""torch.compile for the backbone, kept compiled through a freeze/unfreeze schedule.

Dynamo guards on every parameter's `requires_grad`, so each unfreeze recompiles the backbone,
and train and eval mode, and a last smaller batch, are graphs of their own. Past
`recompile_limit` (8) graphs of one function, dynamo silently runs it uncompiled for the rest
of the run: with `gradual` unfreezing that happened in epoch 3. The schedule is known before
the first step, so the limit is raised up front to 8 per phase of it (each distinct set of
trainable stages): every phase gets the room a run without unfreezing has. Old phases never
come back, and their graphs cost only a failed guard check each, most recent first.

`CompiledGraphs` logs how many graphs were compiled and warns if anything fell back to eager.
It reads dynamo's process-wide counters (`torch._dynamo.utils.counters`, checked against
torch 2.4-2.14): other compiled code in the process counts too.
"""

from __future__ import annotations

import inspect
import logging

import torch
from lightning.pytorch import Callback

from finetune import finetuning as ft

log = logging.getLogger(__name__)

GRAPHS_PER_PHASE = 8  # dynamo's default recompile_limit: what a run without unfreezing gets


def schedule_phases(task) -> int:
    """How many distinct sets of trainable stages the task's schedule goes through."""
    config, stages = task.finetuning, len(task.stages)
    last = max(config.get("unfreeze_at") or [0])
    return len({ft.trainable_stage_count(config, stages, epoch) for epoch in range(last + 1)})


def compile_backbone(task, backend: str | None = None) -> int:
    """Compile `task.backbone` in place with a recompile limit sized to the schedule; return it.

    In place (Module.compile): parameter names, and so checkpoints, stay the same, unlike
    torch.compile(module), which wraps it in `_orig_mod`."""
    limit = GRAPHS_PER_PHASE * schedule_phases(task)
    kwargs = {"backend": backend} if backend else {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # newer torch: for this call only
        kwargs["recompile_limit"] = limit
    else:
        from torch import _dynamo  # imported when needed: ~1 s

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, limit)
    task.backbone.compile(**kwargs)
    log.info("compiled the backbone with torch.compile, up to %d graphs (the first steps include compilation)", limit)
    return limit


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["frames"]["total"] - counters["frames"]["ok"]


class CompiledGraphs(Callback):
    """Logs `compile/graphs` (graphs compiled since the fit started) every epoch, and warns
    when a function ran uncompiled instead (the recompile limit, or an unsupported op)."""

    def __init__(self):
        self.graphs = 0
        self.uncompiled = 0
        self._start = (0, 0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = _dynamo_counts()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        graphs, failed = _dynamo_counts()
        self.graphs, uncompiled = graphs - self._start[0], failed - self._start[1]
        if uncompiled > self.uncompiled:
            log.warning(
                "torch.compile: %d function(s) fell back to eager by epoch %d (recompile limit or an unsupported "
                "op); TORCH_LOGS=recompiles shows why", uncompiled, trainer.current_epoch,
            )
        self.uncompiled = uncompiled
        pl_module.log("compile/graphs", float(self.graphs), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        fallback = f"{self.uncompiled} fell back to eager" if self.uncompiled else "nothing fell back to eager"
        log.info("torch.compile: %d graphs compiled in this fit; %s", self.graphs, fallback)
