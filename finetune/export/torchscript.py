"""TorchScript: a traced module (torch.jit.load in Python or libtorch in C++), metadata as the
extra file `metadata.json`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from finetune.export.graph import ExportGraph
from finetune.export.metadata import TORCHSCRIPT_FILE


def export_torchscript(graph: ExportGraph, path: str | Path, metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tracing (not scripting): the timm and task code is Python that TorchScript cannot compile.
    # Traced shape arithmetic stays dynamic; the parity check runs other batch sizes and sizes.
    # The graph holds the plain network (finetune.models), no LightningModule, so Lightning's
    # tracing workarounds are not needed.
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarning: segmentation's minimum-size check is Python, so frozen (it passes at
        # 64x96). FutureWarning: torch 2.14 deprecates TorchScript; libtorch users still need it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(graph.eval(), (graph.example_input(),), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_FILE: json.dumps(metadata)})
    return path
