"""Load a `finetune fit` checkpoint for export: the task's network (a plain nn.Module, rebuilt
from the hyperparameters, pretrained weights never fetched), its contract, its preprocessing
and its training config, as plain values. No LightningModule is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.contract import TaskContract, build_network, class_names_of, contract_of
from finetune.export.metadata import plain
from finetune.preprocessing import Preprocessing

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    network: nn.Module  # in eval mode, with the checkpoint's weights
    contract: TaskContract
    hparams: dict  # the task's hyperparameters
    preprocessing: Preprocessing
    config: dict  # {"model": {"class_path", "init_args"}, "data": {...} or None}
    data: dict  # the DataModule's hyperparameters ({} if none were saved)

    @property
    def class_names(self) -> list[str]:
        return class_names_of(self.hparams)

    @property
    def data_root(self) -> str | None:
        """Where the training images are: the data folder, or the folder of a manifest's file."""
        manifest = self.data.get("manifest")
        return self.data.get("root") or (str(Path(manifest).expanduser().parent) if manifest else None)

    def metadata_extras(self) -> dict:
        return self.contract.metadata(self.hparams, self.data)


def _init_args(hparams: dict) -> dict:
    return plain({k: v for k, v in hparams.items() if not k.startswith("_")})


def resolve_preprocessing(contract: TaskContract, hparams: dict, data: dict) -> Preprocessing:
    """The checkpoint's own (linked from the DataModule at fit); checkpoints from before it was
    stored: resolved from the data config and the backbone's pretrained config as the
    DataModules did."""
    if hparams.get("preprocessing"):
        return Preprocessing.from_dict(hparams["preprocessing"])
    overrides = {key: data.get(key) for key in ("image_size", "mean", "std", "crop_pct", "interpolation")}
    return Preprocessing.resolve(hparams["backbone"], **overrides, full_resolution=contract.full_resolution)


def network_weights(network: nn.Module, state_dict: dict, path) -> dict:
    """The network's tensors out of the task's state dict (`net.*`; older checkpoints: top level)."""
    expected = network.state_dict()
    found = {key: state_dict[f"net.{key}"] if f"net.{key}" in state_dict else state_dict.get(key) for key in expected}
    missing = [key for key, tensor in found.items() if tensor is None]
    if missing:
        raise ValueError(f"--ckpt_path: {path} lacks {len(missing)} weights of the network (e.g. {missing[0]!r})")
    return found


def load_checkpoint(path: str | Path) -> Loaded:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path: {path} does not exist; pass a checkpoint of `finetune fit` (runs/<name>/checkpoints/last.ckpt)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (not a zip, not plain tensors: many error types)
        raise ValueError(f"--ckpt_path: {path} is not a PyTorch checkpoint ({type(err).__name__})") from None
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not hparams or "backbone" not in hparams or "_class_path" not in hparams:
        raise ValueError(f"--ckpt_path: {path} has no finetune hyperparameters; export a checkpoint written by `finetune fit`")
    contract = contract_of(hparams["_class_path"])
    network = build_network(contract.network, hparams)
    network.load_state_dict(network_weights(network, raw["state_dict"], path))
    data = raw.get("datamodule_hyper_parameters") or {}
    if not data and not hparams.get("preprocessing"):
        log.warning("%s holds no data config: preprocessing from %s's pretrained config", path, hparams["backbone"])
    config = {
        "model": {"class_path": hparams["_class_path"], "init_args": _init_args(hparams)},
        "data": {"class_path": data.get("_class_path"), "init_args": _init_args(data)} if data else None,
    }
    return Loaded(
        network=network.eval(), contract=contract, hparams=dict(hparams),
        preprocessing=resolve_preprocessing(contract, hparams, data), config=config, data=dict(data),
    )
