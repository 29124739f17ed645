"""Weights & Biases that works with no login and no network, and keeps its files in the run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

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

    `log_model: true`: at the end of a successful fit, the best and the last checkpoint become
    versions of the model artifact `model-<run id>`, aliased `best` and `latest`, with the
    monitored metric's score in their metadata; offline runs keep them for `wandb sync`.
    """

    def __init__(
        self,
        project: str = "finetune",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs,
    ):
        save_dir = save_dir or "runs"
        if offline is None:
            reason = offline_reason()
            offline = reason is not None
            if offline:
                log.warning("W&B runs offline: %s. Upload later with `wandb sync %s/wandb/offline-run-*`", reason, save_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        keep_wandb_files_under(Path(save_dir).resolve())
        # Lightning refuses log_model offline ("cannot be uploaded"), yet an offline run stores
        # artifacts like any other record and `wandb sync` uploads them: the logging is ours.
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=False, **kwargs)
        self.log_model = bool(log_model)
        self.checkpoint_callbacks: list[ModelCheckpoint] = []
        self.latest_metrics: dict[str, float] = {}  # the score of last.ckpt, which ModelCheckpoint does not keep

    def log_metrics(self, metrics, step: int | None = None) -> None:
        self.latest_metrics.update(metrics)
        super().log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # Called on every save (rank 0), with a weakref proxy (`in` compares the callbacks behind
        # it): remember the callback, log its files once at the end, not a checkpoint per epoch.
        if self.log_model and checkpoint_callback not in self.checkpoint_callbacks:
            self.checkpoint_callbacks.append(checkpoint_callback)

    def finalize(self, status: str) -> None:
        # Checkpoints of a failed or interrupted fit are not logged; the fit resumed from its
        # last.ckpt logs into the same run (finetune.callbacks.wandb_run).
        if status == "success":
            self._log_checkpoints()
        super().finalize(status)
        # One run per fit. Lightning's logger leaves the W&B run open, and the next
        # WandbLogger in the same process (a notebook, a test) would silently log into it.
        finish_wandb_run(self, exit_code=0 if status == "success" else 1)

    @rank_zero_only
    def _log_checkpoints(self) -> None:
        for callback in self.checkpoint_callbacks:
            log_checkpoint_artifacts(self.experiment, callback, self.latest_metrics.get(callback.monitor))


def log_checkpoint_artifacts(run, callback: ModelCheckpoint, last_score: float | None) -> None:
    """The best checkpoint (alias `best`), then last.ckpt (alias `latest`), as versions of the
    artifact `model-<run id>`, with the monitored metric's score: the best one's, and
    `last_score` (the metric's latest value: last.ckpt is written after every validation).
    ModelCheckpoint's `current_score` would not do: it changes only when a best file is saved."""
    import wandb

    files = [(callback.best_model_path, callback.best_model_score, "best"),
             (callback.last_model_path, last_score, "latest")]
    for path, score, alias in files:
        if not path or not Path(path).is_file():
            continue
        metadata = {
            "score": None if score is None else float(score),
            "monitor": callback.monitor,
            "mode": callback.mode,
            "original_filename": Path(path).name,
        }
        artifact = wandb.Artifact(name=f"model-{run.id}", type="model", metadata=metadata)
        # "mutable": staged as a copy, so a later fit overwriting last.ckpt cannot change what
        # an offline run uploads at `wandb sync`.
        artifact.add_file(path, name="model.ckpt", policy="mutable")
        run.log_artifact(artifact, aliases=[alias])
