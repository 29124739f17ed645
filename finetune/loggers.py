"""Weights & Biases that works with no login and no network, and keeps its files in the run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from finetune.hub import host_reachable
from finetune.lightning_internals import finish_wandb_run

log = logging.getLogger(__name__)


def wandb_api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        import netrc

        auth = netrc.netrc().authenticators(_wandb_host())
        return auth[2] if auth else None
    except (OSError, netrc.NetrcParseError):
        return None


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(_wandb_base_url()).hostname or "api.wandb.ai"


def offline_reason() -> str | None:
    """Why W&B should run offline, or None when an online run can work."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "dryrun"}:
        return f"WANDB_MODE={mode}"
    if mode == "online":
        return None
    if not wandb_api_key():
        return "no W&B credentials (run `wandb login` or set WANDB_API_KEY)"
    if not host_reachable(_wandb_base_url()):
        return f"{_wandb_host()} is unreachable"
    return None


def keep_wandb_files_under(folder: Path) -> None:
    """Point W&B's cache, staging and artifact folders into the run folder, unless the user chose."""
    for var, sub in (("WANDB_CACHE_DIR", ".cache"), ("WANDB_DATA_DIR", ".data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        os.environ.setdefault(var, str(folder / "wandb" / sub))


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, online when it can be and offline (a local run) otherwise.

    `offline: null` (default) decides by itself: no credentials or no route to the W&B server
    means an offline run under `save_dir/wandb/offline-run-*` that `wandb sync` uploads later.
    Training never waits on the network for that decision (one 3 s probe at most).
    `save_dir` defaults to the trainer's `default_root_dir` when run through the CLI.
    """

    def __init__(
        self,
        project: str = "finetune",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool | str = False,
        **kwargs,
    ):
        save_dir = save_dir or "runs"
        if offline is None:
            reason = offline_reason()
            offline = reason is not None
            if offline:
                log.warning("W&B runs offline: %s. Upload later with `wandb sync %s/wandb/offline-run-*`", reason, save_dir)
        if offline and log_model:
            log.warning("W&B is offline: checkpoints stay on disk instead of being logged as artifacts")
            log_model = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        keep_wandb_files_under(Path(save_dir).resolve())
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs)

    def finalize(self, status: str) -> None:
        # One run per fit. Lightning's logger leaves the W&B run open, and the next
        # WandbLogger in the same process (a notebook, a test) would silently log into it.
        super().finalize(status)
        finish_wandb_run(self, exit_code=0 if status == "success" else 1)
