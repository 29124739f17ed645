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


def model_record(loaded) -> dict:
    """The task class and its arguments as an exported folder or file records them (safetensors
    release, Hub folder): the weights are beside, so nothing is to be fetched at rebuild."""
    model = loaded.config["model"]
    return {"class_path": model["class_path"], "init_args": {**model["init_args"], "pretrained": False, "weights": None}}


def network_of_record(model: dict) -> nn.Module:
    """The (untrained) network of a `model_record`."""
    return build_network(contract_of(model["class_path"]).network, model["init_args"])


def save_release(loaded, path: str | Path) -> tuple[Path, Path]:
    """`loaded`: a finetune.export.checkpoint.Loaded. Returns (weights, config) paths."""
    weights, config = release_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in loaded.network.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "finetune-release", "config": config.name})
    document = {
        "format_version": FORMAT_VERSION,
        "task": loaded.contract.name,
        "model": model_record(loaded),
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
    network = network_of_record(document["model"])
    network.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return network.eval()
