"""Run-time speed settings: channels_last, torch.compile, Lightning's batch-size finder, and
the CLI's default profiler.

They are CLI-level options (`--channels_last`, `--compile`, `--compile_backend`,
`--batch_size_find`, `--trainer.profiler`), not model hyperparameters: a checkpoint trained with them loads and
runs without them.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.tuner import Tuner

from finetune.compile import compile_backbone

_NOTHING = contextlib.nullcontext()  # reentrant: one serves every (nested) hook


class NoProfiler(PassThroughProfiler):
    """The CLI's default profiler: profiles nothing, like Lightning's default, in less time.

    Lightning wraps every hook and callback call in `profiler.profile(...)`, ~25 a training
    step; its default profiler does nothing through a `contextmanager` generator each time,
    ~65 us a step here (benchmarks/overhead.py). `--trainer.profiler simple` (or advanced,
    pytorch) replaces it as usual."""

    def profile(self, action_name: str):
        return _NOTHING


def apply_speed_settings(
    model, channels_last: bool = False, compile: bool = False, datamodule=None, compile_backend: str | None = None
) -> None:
    if channels_last:
        # NHWC is what tensor cores read, so no conv pays a layout change. The DataModule
        # converts its uint8 batches before normalising them (finetune.data.normalize): a
        # quarter of the bytes of converting the float batch. The backbone hook converts inputs
        # that come another way, and leaves a channels_last one as it is.
        model.to(memory_format=torch.channels_last)
        model.backbone.register_forward_pre_hook(_channels_last_input)
        if datamodule is not None:
            datamodule.channels_last = True
    if compile:
        # The backbone is where the time goes, in every task (finetune/compile.py).
        compile_backbone(model, compile_backend)


def _channels_last_input(module, args):
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest) if images.dim() == 4 else None


def run_batch_size_find(trainer, model, datamodule, max_trials: int) -> int:
    """Lightning's power-of-two search from the configured batch size, kept for the fit.

    `max_trials` (sizes tried, the first included) bounds it: on a CPU nothing runs out of memory, so without a bound it would
    double until the host does.
    """
    start = datamodule.hparams.batch_size
    found = Tuner(trainer).scale_batch_size(
        model, datamodule=datamodule, mode="power", init_val=start, max_trials=max_trials, batch_arg_name="batch_size",
    )
    print(f"batch size: {found} (tried up to {max_trials} sizes from {start}, doubling); training with it")
    return found
