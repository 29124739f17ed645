"""An exported model as a W&B artifact of the run that trained it (`finetune export`)."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.callbacks.wandb_run import wandb_run_in
from finetune.errors import FinetuneError
from finetune.export.release import release_paths
from finetune.loggers import keep_wandb_files_under, offline_reason

log = logging.getLogger(__name__)


def log_exported(path: Path, ckpt_path: str, metadata: dict) -> None:
    """Log `path` (an .onnx, TorchScript or .safetensors file, or a hub folder) as a "model"
    artifact with `metadata`, in the W&B run the checkpoint was trained in, then finish the run.

    Online when W&B can be reached, else offline (`wandb sync` uploads it). W&B's files go under
    the training run's folder: the folder above the checkpoint's when that holds `wandb/`
    (the default `<default_root_dir>/checkpoints/`), else the checkpoint's own folder.
    """
    import wandb

    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such exported file or folder; export it first")
    run_id, project = wandb_run_in(ckpt_path)
    if run_id is None:
        raise FinetuneError(
            f"ckpt_path: {ckpt_path} holds no W&B run id (trained without finetune.loggers.WandbLogger, "
            "or before checkpoints kept it); the export is not logged"
        )
    if wandb.run is not None:  # wandb.init would hand back that run and the export would land in it
        raise FinetuneError(f"W&B run {wandb.run.id} is still open in this process; wandb.finish() it, then log the export")
    run_folder = _run_folder(Path(ckpt_path))
    keep_wandb_files_under(run_folder)
    reason = offline_reason()
    if reason:
        log.warning("W&B runs offline: %s. Upload later with `wandb sync %s/wandb/offline-run-*`", reason, run_folder)
    artifact = wandb.Artifact(name=f"{_kind(path)}-{run_id}", type="model", metadata=metadata)
    if path.is_dir():
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
        release_config = release_paths(path)[1]
        if path.suffix == ".safetensors" and release_config.is_file():  # the weights alone rebuild nothing
            artifact.add_file(str(release_config))
    run = wandb.init(id=run_id, project=project, resume="allow", dir=str(run_folder), mode="offline" if reason else "online")
    try:
        run.log_artifact(artifact, aliases=["latest"])
    finally:
        run.finish()


def _run_folder(ckpt: Path) -> Path:
    above = ckpt.resolve().parent.parent
    return above if (above / "wandb").is_dir() else ckpt.resolve().parent


def _kind(path: Path) -> str:
    """The artifact's name before the run id: `onnx`, `torchscript`, `safetensors`, `hub`."""
    if path.is_dir():
        return "hub"
    if path.name.endswith(".torchscript.pt") or path.suffix == ".pt":
        return "torchscript"
    return path.suffix.lstrip(".") or "export"
