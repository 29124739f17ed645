"""What travels inside an exported file: task, writer, classes, preprocessing, outputs, training config.

ONNX: one `metadata_props` entry per key, each value JSON. TorchScript: the same dict as JSON in
the extra file `metadata.json`. Reading it needs onnx/onnxruntime or torch, and json: no
`finetune`. No torch or Lightning import here: the ONNX runtime path reads it without either.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
TORCHSCRIPT_FILE = "metadata.json"
INPUT_NAME = "image"

INPUTS = {
    True: "uint8 [N, H, W, 3] RGB, 0-255; normalised inside the graph",
    False: "float32 [N, 3, H, W] RGB, normalised: (pixel / 255 - mean) / std",
}


def plain(value):
    """A JSON- and YAML-safe copy: tuples become lists, anything unusual its string."""
    return json.loads(json.dumps(value, default=str))


def build_metadata(loaded, file_format: str, normalize_in_graph: bool) -> dict:
    """`loaded`: a finetune.export.checkpoint.Loaded. The task's contract says the outputs (in
    the graph's order), how predictions are written, and any extras (palette, embedding size)."""
    from finetune import __version__

    contract = loaded.contract
    meta = {
        "format_version": FORMAT_VERSION,
        "producer": f"finetune {__version__}",
        "format": file_format,
        "task": contract.name,
        "writer": contract.writer,
        "backbone": loaded.hparams["backbone"],
        "class_names": loaded.class_names,
        "input": {"name": INPUT_NAME, "layout": INPUTS[normalize_in_graph], "normalized_in_graph": normalize_in_graph},
        **loaded.preprocessing.to_dict(),
        "outputs": dict(contract.outputs),
        "config": loaded.config,
        **loaded.metadata_extras(),
    }
    return plain(meta)


def to_props(meta: dict) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in meta.items()}


def from_props(props: dict[str, str]) -> dict:
    """Our keys are JSON; a key someone else added may not be, and is kept as text."""
    meta = {}
    for key, value in props.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported .onnx or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return from_props({prop.key: prop.value for prop in model.metadata_props})
    import warnings

    import torch

    files = {TORCHSCRIPT_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_FILE]) if files[TORCHSCRIPT_FILE] else {}
