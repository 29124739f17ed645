"""Find host syncs in steady-state training steps: the places where the CPU waits for the GPU.

A read of a device tensor on the host (`.item()`, `float(t)`, `if t:`, `.cpu()`, a boolean
mask, `nonzero`) blocks until every queued kernel has run, so the next step cannot be queued
while this one computes. Logging steps read their metrics on purpose; every other step should
read nothing.

`HostSyncRecorder` watches the whole loop from the end of one training batch to the end of the
next (data fetch, `on_after_batch_transfer`, forward, backward, optimizer step, callbacks,
progress bar, Lightning's own loop code), skipping windows that touch a logging step, an
epoch end or validation. On CUDA it uses torch's own detector
(`torch.cuda.set_sync_debug_mode("warn")`). On CPU nothing syncs, so it records the calls that
would: tensor reads by name. Used by tests/test_speed.py and benchmarks/gpu_check.py.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

from finetune.lightning_internals import is_logging_step

# Reads of tensors that stay on the CPU when training on a GPU, so no sync there either; on a
# CPU nothing tells them from device tensors, so they are known by where they are read:
# optimizers' step counters (unless capturable or fused), and the DDP ranks' agreement on
# stopping (a CPU tensor all-reduced over gloo, finetune/callbacks/interruption.py).
CPU_RESIDENT = ("torch/optim/", "int(agreed[0])")
_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")
_HERE = str(Path(__file__))


def _is_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> str:
    """`path:line code` of the innermost frame outside this module and torch's Tensor class."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if frame.filename != _HERE and not frame.filename.endswith(("torch/_tensor.py", "torch/overrides.py")):
            parts = Path(frame.filename).parts
            short = "/".join(parts[-3:]) if "site-packages" in parts else "/".join(parts[-2:])
            return f"{short}:{frame.lineno} {frame.line}"
    return "?"


class HostSyncRecorder(Callback):
    """Records host syncs in training steps that should have none.

    warmup_steps: steps to leave out first (cuDNN autotuning, compilation, allocator growth).
    ignore: substrings of locations that are not syncs on a GPU either, for the CPU mode
        only (default: CPU_RESIDENT).

    After training, `syncs` lists one `path:line code` per sync and `steps` counts the steps
    watched.
    """

    def __init__(self, warmup_steps: int = 1, ignore: tuple[str, ...] = CPU_RESIDENT):
        self.warmup_steps = warmup_steps
        self.ignore = ignore
        self.syncs: list[str] = []
        self.steps = 0
        self._window: list[str] | None = None  # syncs of the open window
        self._opened_on_logging_step = False
        self._cuda_warnings = None
        self._patches: list[tuple[object, str, object]] = []
        self._steps_seen = 0

    # -- windows ------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        logging_step = is_logging_step(trainer)  # this step writes its logs
        if self._window is not None:
            window = self._stop()
            if not (logging_step or self._opened_on_logging_step):
                self.syncs += window
                self.steps += 1
        self._steps_seen += 1
        if self._steps_seen > self.warmup_steps:
            self._opened_on_logging_step = logging_step  # its log writing runs after this hook
            self._start(pl_module.device)

    def _discard(self, *args) -> None:
        if self._window is not None:
            self._stop()

    # Epoch ends, validation and the end of training are no steady-state step.
    on_train_epoch_end = on_validation_start = on_train_end = on_exception = _discard

    # -- detection ----------------------------------------------------------------------------

    def _start(self, device: torch.device) -> None:
        self._window = []
        if device.type == "cuda":
            self._cuda_warnings = warnings.catch_warnings(record=True)
            self._caught = self._cuda_warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._patch_tensor_reads()

    def _stop(self) -> list[str]:
        window, self._window = self._window, None
        if self._cuda_warnings is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._cuda_warnings.__exit__(None, None, None)
            window += [
                f"{Path(w.filename).name}:{w.lineno} {w.message}" for w in self._caught if "synchroniz" in str(w.message)
            ]
            self._cuda_warnings = None
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()
        return window

    def _record(self) -> None:
        if self._window is not None:
            location = _caller()
            if not any(part in location for part in self.ignore):
                self._window.append(location)

    def _patch_tensor_reads(self) -> None:
        def recording(original):
            def read(*args, **kwargs):
                self._record()
                return original(*args, **kwargs)
            return read

        def indexing(original):
            def index(tensor, key, *rest):
                if _is_mask(key):
                    self._record()
                return original(tensor, key, *rest)
            return index

        targets = [(torch.Tensor, name, recording) for name in _READS] + [
            (torch, "nonzero", recording), (torch.Tensor, "__getitem__", indexing), (torch.Tensor, "__setitem__", indexing),
        ]
        for owner, name, wrap in targets:
            original = getattr(owner, name)
            self._patches.append((owner, name, original))
            setattr(owner, name, wrap(original))
