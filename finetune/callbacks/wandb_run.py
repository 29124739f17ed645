"""The W&B run a checkpoint belongs to, kept in the checkpoint, so a resumed fit and an export
write into that run instead of starting a new one."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger

from finetune.contract import import_class

log = logging.getLogger(__name__)

RUN_ID_KEY = "wandb_run_id"
PROJECT_KEY = "wandb_project"


class WandbRunId(Callback):
    """Writes the W&B run id and project into every checkpoint the trainer saves (none without
    a WandbLogger). FinetuneCLI adds it to every trainer."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        logger = next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        # Only rank 0 writes the file; the other ranks' experiment is a stand-in without an id.
        if logger is None or not trainer.is_global_zero:
            return
        checkpoint[RUN_ID_KEY] = logger.version  # the run's id once it started, else the configured id
        checkpoint[PROJECT_KEY] = getattr(logger.experiment, "project", None)


def wandb_run_in(ckpt_path: str | Path) -> tuple[str, str] | tuple[None, None]:
    """(run id, project) a checkpoint was written in, or (None, None) when it holds none.

    Maps the tensors instead of reading them (mmap): a few ms for any checkpoint size."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(ckpt_path))
    run_id = checkpoint.get(RUN_ID_KEY)
    return (run_id, checkpoint.get(PROJECT_KEY)) if run_id else (None, None)


def continue_wandb_run(config, logger_configs: list, check_readable) -> None:
    """A fit resumed from a checkpoint (`--ckpt_path last` or a file) logs into the W&B run
    that wrote it: each configured WandbLogger without an `id` gets the checkpoint's, and
    resume="allow" unless the config sets `resume`. An explicit `id` or `version` wins.
    `config`: the subcommand's parsed config; `logger_configs`: its logger sections;
    `check_readable(path)`: raises the one-line error for a file torch refuses."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("best", "hpc") or ":" in str(ckpt_path):
        return
    path = Path(config.checkpoint.dirpath) / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    loggers = [
        logger for logger in logger_configs
        if is_wandb_logger(logger) and not (logger.init_args.get("id") or logger.init_args.get("version"))
    ]
    if not loggers or not path.is_file():
        return  # `last` without a last.ckpt: Lightning starts afresh, in a new run
    check_readable(path)  # `last`: not checked yet (the CLI checks files at parse time)
    run_id, _ = wandb_run_in(path)
    for logger in loggers if run_id else []:
        logger.init_args.id = run_id
        # The parser fills every wandb.init argument of the logger's **kwargs, `resume: None` too,
        # which would replace Lightning's default "allow".
        if logger.init_args.get("resume") is None:
            logger.init_args.resume = "allow"
        log.info("W&B: continuing run %s from %s", run_id, path)


def is_wandb_logger(logger_config) -> bool:
    class_path = getattr(logger_config, "class_path", None)
    if not class_path or getattr(logger_config, "init_args", None) is None:
        return False
    try:
        cls = import_class(class_path)
    except ValueError:  # not importable: the logger's own instantiation says so, in its words
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)
