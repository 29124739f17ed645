"""Hugging Face Hub folder: `model.safetensors` + `config.json` (timm's layout) + `README.md`.

A classifier whose head is one linear layer on a timm pool is written as timm's own model, so
`timm.create_model("local-dir:DIR", pretrained=True)` (or `hf-hub:user/repo`) gives our logits.
Otherwise (a hidden layer, a pool timm lacks) timm gets the fine-tuned backbone alone and the
head goes into `finetune_head.safetensors`; segmentation and embedding networks, which timm
has no heads for, are written whole. `load_hub_folder` rebuilds our network from any of them:
config.json's `finetune` key says how (class, init args, and how tensor names map).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.backbones import classifier_name
from finetune.errors import FinetuneError
from finetune.export.metadata import FORMAT_VERSION, plain
from finetune.export.release import model_record, network_of_record
from finetune.hub import hub_offline_reason
from finetune.models import Classifier

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
HEAD_WEIGHTS = "finetune_head.safetensors"
PROBE_ATOL = 1e-5  # timm's model must give our logits to this (x max(1, |logit|)), else it is not written as ours


@dataclass
class HubFolder:
    folder: Path
    loader: str  # "timm": timm.create_model gives our network's logits; "finetune": only load_hub_folder does
    timm_gives: str | None  # what timm.create_model("local-dir:...") gives; None: timm cannot load it
    fallback: str | None  # why timm does not give our network (None: it does)
    block: dict  # config.json's `finetune` key


class HubUnavailable(FinetuneError):
    """The Hub cannot be reached or refused the upload: one line, the folder kept."""


def _probe(size: int | None) -> torch.Tensor:
    side = size or 64
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def timm_classifier(loaded) -> tuple[nn.Module | None, str | None]:
    """timm's model holding our weights, if it computes our network's logits; else (None, why)."""
    hp, network = loaded.hparams, loaded.network
    if hp.get("hidden_dim"):
        return None, f"model.hidden_dim {hp['hidden_dim']}: timm's classifier is a single linear layer"
    arch, name = hp["backbone"], classifier_name(hp["backbone"])
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=hp["num_classes"], global_pool=hp["pool"])
    except (AssertionError, KeyError, TypeError, ValueError, RuntimeError):
        return None, f"model.pool {hp['pool']!r}: timm's {arch} has no such pool"
    target = model.state_dict()
    linear = network.head.classifier[-1]
    state = dict(network.backbone.state_dict())
    state.update({f"{name}.weight": linear.weight, f"{name}.bias": linear.bias})
    try:  # ResNetV2's classifier is a 1x1 conv: the same numbers in another shape
        model.load_state_dict({k: v.reshape(target[k].shape) if k in target else v for k, v in state.items()})
    except (RuntimeError, KeyError):
        return None, f"timm's {arch} names or shapes its weights unlike our backbone and head"
    model.eval()
    probe = _probe(loaded.preprocessing.input_size)
    with torch.inference_mode():
        theirs, ours = model(probe), network(probe)
    # A 1x1 conv (ResNetV2) sums in another order than nn.Linear: equal up to float rounding.
    if (theirs - ours).abs().max() > PROBE_ATOL * max(1.0, float(ours.abs().max())):
        return None, f"timm's {arch} with global_pool {hp['pool']!r} computes other logits than our head"
    return model, None


def _finetune_block(loaded, layout: dict, activation: str | None) -> dict:
    """What config.json's `finetune` key holds: how load_hub_folder rebuilds our network."""
    from finetune import __version__

    block = {
        "format_version": FORMAT_VERSION,
        "producer": f"finetune {__version__}",
        "task": loaded.contract.name,
        "backbone": loaded.hparams["backbone"],
        "class_names": loaded.class_names,
        "outputs": dict(loaded.contract.outputs),
        **({"activation": activation} if activation else {}),
        **loaded.metadata_extras(),
        "preprocessing": loaded.preprocessing.to_dict(),
        "model": model_record(loaded),
        "state_dict": layout,
        "data": loaded.config["data"],
    }
    return plain(block)


def _timm_data_config(preprocessing) -> dict:
    prep = preprocessing.to_dict()
    squash = prep.get("resize_mode") == "squash"  # the whole image resized: timm's crop_mode "squash" at crop_pct 1
    return {
        "input_size": tuple(prep["input_size"]), "mean": tuple(prep["mean"]), "std": tuple(prep["std"]),
        "interpolation": prep["interpolation"], "crop_pct": 1.0 if squash else prep["crop_pct"],
        "crop_mode": "squash" if squash else "center",
    }


def _activation(network: nn.Module) -> str:
    """The classifier's activation by name: softmax (a row sums to 1) or sigmoid (one per label)."""
    total = float(network.activation(torch.tensor([[0.0, 1.0]])).sum())
    return "softmax" if abs(total - 1.0) < 1e-6 else "sigmoid"


def _save_timm(model: nn.Module, folder: Path, loaded, block: dict, labelled: bool) -> None:
    import inspect

    from timm.models import save_for_hf

    config = {"finetune": block}
    if labelled:
        config["label_names"] = loaded.class_names
    data = _timm_data_config(loaded.preprocessing)
    if "data_config" in inspect.signature(save_for_hf).parameters:
        save_for_hf(model, str(folder), model_config=config, safe_serialization=True, data_config=data)
        return
    model.pretrained_cfg = {**model.pretrained_cfg, **data}  # timm before data_config: read from here
    save_for_hf(model, str(folder), model_config=config, safe_serialization=True)


def write_hub_folder(loaded, folder: str | Path) -> HubFolder:
    """model.safetensors + config.json (the card comes after the parity check). `loaded`: a
    finetune.export.checkpoint.Loaded."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"--output: {folder} is a file; --format hub writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEAD_WEIGHTS).unlink(missing_ok=True)  # from an earlier export of another head
    network, arch = loaded.network, loaded.hparams["backbone"].split(".")[0]
    # The mapping onto timm needs Classifier's layout (backbone + head.classifier); segmentation
    # and embedding networks have heads timm lacks.
    if not isinstance(network, Classifier):
        block = _finetune_block(loaded, {"prefix": "", "renamed": {}, "extra_file": None}, None)
        _save_whole(network, folder, loaded, block)
        return HubFolder(folder, "finetune", None, f"timm has no {loaded.contract.name} head", block)
    activation = _activation(network)
    model, why = timm_classifier(loaded)
    if model is not None:
        name = classifier_name(loaded.hparams["backbone"])
        last = f"head.classifier.{len(network.head.classifier) - 1}"  # the final nn.Linear
        renamed = {f"{name}.{p}": f"{last}.{p}" for p in ("weight", "bias")}
        block = _finetune_block(loaded, {"prefix": "backbone.", "renamed": renamed, "extra_file": None}, activation)
        _save_timm(model, folder, loaded, block, labelled=True)
        if network.uses_tta:  # timm's model is our network without the averaged test-time views
            why = "model.tta_flip / model.tta_scales: timm's model has no test-time augmentation"
            return HubFolder(folder, "finetune", f"{arch} with our classifier, without test-time augmentation", why, block)
        return HubFolder(folder, "timm", f"{arch} with our classifier", None, block)
    plain_model = timm.create_model(loaded.hparams["backbone"], pretrained=False, num_classes=0)
    plain_model.load_state_dict(network.backbone.state_dict())
    head = {f"head.{k}": v.detach().contiguous() for k, v in network.head.state_dict().items()}
    save_file(head, str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
    block = _finetune_block(loaded, {"prefix": "backbone.", "renamed": {}, "extra_file": HEAD_WEIGHTS}, activation)
    _save_timm(plain_model.eval(), folder, loaded, block, labelled=False)
    return HubFolder(folder, "finetune", f"{arch}'s pooled features (no classifier)", why, block)


def _save_whole(network: nn.Module, folder: Path, loaded, block: dict) -> None:
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    prep = loaded.preprocessing.to_dict()
    extras = loaded.metadata_extras()
    config = {
        # No `architecture`: timm cannot build this network; finetune.export.hub.load_hub_folder can.
        **({"num_features": extras["embedding_dim"]} if "embedding_dim" in extras else
           {"num_classes": len(loaded.class_names), "label_names": loaded.class_names}),
        "pretrained_cfg": {k: v for k, v in prep.items() if v is not None},
        "finetune": block,
    }
    (folder / CONFIG).write_text(json.dumps(plain(config), indent=2))


def load_hub_folder(folder: str | Path) -> nn.Module:
    """Our network (finetune.models), in eval mode, from a folder of `finetune export --format hub`."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; write the folder with `finetune export --format hub`")
    block = json.loads((folder / CONFIG).read_text()).get("finetune")
    if not block:
        raise ValueError(f"{folder / CONFIG}: no `finetune` key, so not written by `finetune export --format hub`; "
                         f"load it with timm.create_model('local-dir:{folder}', pretrained=True)")
    network = network_of_record(block["model"])
    layout, expected = block["state_dict"], network.state_dict()
    state = {}
    for key, tensor in load_file(str(folder / WEIGHTS), device="cpu").items():
        name = layout["renamed"].get(key, layout["prefix"] + key)
        state[name] = tensor.reshape(expected[name].shape) if name in expected else tensor
    if layout.get("extra_file"):
        state.update(load_file(str(folder / layout["extra_file"]), device="cpu"))
    network.load_state_dict(state, strict=True)
    return network.eval()


class TimmNetwork(nn.Module):
    """timm's model with our network's `predict` (logits and their activation), for the parity check."""

    def __init__(self, model: nn.Module, activation):
        super().__init__()
        self.model, self.activation = model, activation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(images)
        return {"logits": logits, "probabilities": self.activation(logits)}


def reload_hub_folder(hub: HubFolder, loaded) -> nn.Module:
    """What a user gets back: timm's model where it is ours, else load_hub_folder's."""
    if hub.loader != "timm":
        return load_hub_folder(hub.folder)
    timm_log = logging.getLogger("timm")
    level = timm_log.level
    timm_log.setLevel(logging.WARNING)  # three INFO lines on where the weights came from: we know
    try:
        model = timm.create_model(f"local-dir:{hub.folder}", pretrained=True).eval()
    finally:
        timm_log.setLevel(level)
    return TimmNetwork(model, loaded.contract.network.activation).eval()


# ---- upload --------------------------------------------------------------------------------

def upload_commands(repo_id: str, folder: Path) -> str:
    return f"`hf upload {repo_id} {folder}` (huggingface_hub before 1.0: `huggingface-cli upload {repo_id} {folder}`)"


def push_hub_folder(folder: str | Path, repo_id: str) -> str:
    """Upload the folder to the Hub model repo `repo_id` (created if missing); returns its URL.
    Offline or refused: HubUnavailable, one line that says how to upload the folder later."""
    folder = Path(folder)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"--push_to_hub: {repo_id!r} is not a Hub repo id; pass user/repo")
    ready = f"{folder} is written and ready for {upload_commands(repo_id, folder)}"
    why = hub_offline_reason()
    if why:
        raise HubUnavailable(f"--push_to_hub: {why}, so nothing was uploaded; {ready}")
    from huggingface_hub import HfApi

    from finetune import __version__

    api = HfApi(library_name="finetune", library_version=__version__)
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), commit_message="Upload finetune export")
    except (OSError, ValueError) as err:  # HfHubHTTPError and missing tokens are OSErrors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HubUnavailable(f"--push_to_hub: the upload to {repo_id} failed ({reason}; log in with `hf auth login` "
                             f"or set HF_TOKEN); {ready}") from None
    return str(url)
