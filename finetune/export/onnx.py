"""ONNX: a self-contained .onnx with dynamic batch, height and width, metadata in metadata_props.

Exporter: torch.onnx's dynamo path (`dynamo=True`, torch.export underneath; the default since
torch 2.9). The TorchScript-based one (`dynamo=False`) traces, so a Python decision on a shape is
frozen without a word, and torch marks it deprecated ("will be removed"). torch.export keeps the
sizes symbolic and fails where it cannot. It can still fix a size silently when the example
makes an intermediate size 1 (see graph.EXAMPLE_HEIGHT), so the input dims are checked after.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.export import Dim

from finetune.export.graph import ExportGraph
from finetune.export.metadata import INPUT_NAME, to_props


@contextmanager
def _quiet(*names: str):
    """The graph optimiser logs every pass at INFO, which `finetune` shows: keep warnings only."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(graph: ExportGraph, path: str | Path, metadata: dict, min_size: int = 16) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (1, 2) if graph.normalize_in_graph else (2, 3)
    dims = {0: Dim("batch", min=1), height: Dim("height", min=min_size), width: Dim("width", min=min_size)}
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir"):
        # torch.export's notes on Lightning's properties and deprecations: not ours to act on.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.eval(), (graph.example_input(),), dynamo=True, verbose=False,
            input_names=[INPUT_NAME], output_names=graph.output_names,
            dynamic_shapes={"image": dims}, external_data=False,
        )
    shape = program.model.graph.inputs[0].shape
    fixed = [name for axis, name in ((0, "batch"), (height, "height"), (width, "width")) if isinstance(shape[axis], int)]
    if fixed:
        raise RuntimeError(f"the ONNX exporter fixed {', '.join(fixed)} of the input ({shape}); the graph would not be dynamic")
    program.model.metadata_props.update(to_props(metadata))
    # One file (weights inside) while under protobuf's 2 GB: ResNet-152 is ~240 MB.
    program.save(str(path), external_data=False)
    return path
