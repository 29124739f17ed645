"""Weights-only release: `<name>.safetensors` (tensors) + `<name>.yaml` (plain config). Rebuilding
runs no pickle (fastai's pickled export breaks when code moves: fastai #2814, #1540); it needs
this package for the model code, and only these two files."""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.contract import build_network, contract_of
from finetune.export.metadata import FORMAT_VERSION, plain

_HEADER = """\
# finetune weights-only release: rebuild the model from this file and the .safetensors beside it:
#   from finetune.export.release import load_release
#   network = load_release("{weights}", "{config}")
"""


def release_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    return path.with_suffix(".safetensors"), path.with_suffix(".yaml")


def save_release(loaded, path: str | Path) -> tuple[Path, Path]:
    """`loaded`: a finetune.export.checkpoint.Loaded. Returns (weights, config) paths."""
    weights, config = release_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in loaded.network.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "finetune-release", "config": config.name})
    model = loaded.config["model"]
    document = {
        "format_version": FORMAT_VERSION,
        "task": loaded.contract.name,
        # The weights are in the file beside: nothing to download or read at rebuild.
        "model": {"class_path": model["class_path"], "init_args": {**model["init_args"], "pretrained": False, "weights": None}},
        "preprocessing": loaded.preprocessing.to_dict(),
        "data": loaded.config["data"],  # the training data config, for the record
    }
    config.write_text(_HEADER.format(weights=weights.name, config=config.name) + yaml.safe_dump(plain(document), sort_keys=False))
    return weights, config


def load_release(weights: str | Path, config: str | Path) -> nn.Module:
    """The network (finetune.models), in eval mode, from a release's .safetensors and .yaml."""
    for path, flag in ((weights, "weights"), (config, "config")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: {path} does not exist; write it with `finetune export --format safetensors`")
    document = yaml.safe_load(Path(config).read_text())
    model = document["model"]
    network = build_network(contract_of(model["class_path"]).network, model["init_args"])
    network.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return network.eval()
