"""`finetune fit | validate | test | predict --config configs/<name>.yaml` (LightningCLI)."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Optional

# Set before albumentations is imported anywhere: its update check goes to the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from finetune.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from finetune.callbacks.embedding import EmbeddingWriter  # noqa: E402
from finetune.callbacks.interruption import Interruption  # noqa: E402
from finetune.callbacks.nonfinite import NonFiniteGuard  # noqa: E402
from finetune.callbacks.predictions import PredictionCSVWriter  # noqa: E402
from finetune.callbacks.progress import ProgressBar  # noqa: E402
from finetune.compile import CompiledGraphs  # noqa: E402
from finetune.errors import (  # noqa: E402
    FinetuneError,
    UnsafeFileError,
    condense_parse_error,
    unreadable_file_message,
    user_message,
)
from finetune.lr_find import run_lr_find  # noqa: E402
from finetune.speed import apply_speed_settings, run_batch_size_find  # noqa: E402
from finetune.tasks.base import FinetuneTask  # noqa: E402

log = logging.getLogger("finetune")


def _logger_configs(logger_cfg) -> list:
    if logger_cfg in (None, True, False):
        return []
    return list(logger_cfg) if isinstance(logger_cfg, list) else [logger_cfg]


class FinetuneArgumentParser(LightningArgumentParser):
    """A parse error as one line naming the key (`model.scheduler: 'cosin' is not one of ...`)
    instead of ~100 lines of usage and jsonargparse's nested Union report.
    JSONARGPARSE_DEBUG=1 shows the full report."""

    def error(self, message, *args, **kwargs):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, *args, **kwargs)
        sys.stderr.write(f"error: {condense_parse_error(str(message))}\n")
        self.exit(2)


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks get their own config section (`checkpoint.*`, `predictions.*`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:02d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
        parser.add_lightning_class_args(EmbeddingWriter, "embeddings")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")  # stop at a NaN/inf loss
        parser.add_lightning_class_args(Interruption, "interruption")  # SIGTERM/Ctrl+C: save, exit
        parser.add_argument(
            "--lr_find", type=bool, default=False,
            help="fit only: run the LR range test (Lightning Tuner), print and plot the suggestion, then stop",
        )
        parser.add_argument("--lr_find_steps", type=int, default=100, help="training steps the LR range test takes")
        # Speed settings (finetune/speed.py): run-time choices, not model hyperparameters.
        parser.add_argument("--channels_last", type=bool, default=False, help="NHWC memory format (faster convs on GPUs)")
        parser.add_argument("--compile", type=bool, default=False, help="torch.compile the backbone (in place)")
        parser.add_argument(
            "--compile_backend", type=Optional[str], default=None,
            help="torch.compile backend (default: inductor; eager or aot_eager to debug compilation)",
        )
        parser.add_argument(
            "--batch_size_find", type=bool, default=False,
            help="fit only: find the largest power-of-two batch size that fits (Lightning Tuner), then train with it",
        )
        parser.add_argument("--batch_size_find_trials", type=int, default=6, help="batch sizes to try: the configured one, then doublings")
        # Facts of the data go into the model, never typed twice.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # The transforms need the backbone's pretrained input size, mean and std.
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or "runs")
        config.trainer.default_root_dir = str(root)
        # A fixed checkpoint folder (not one per logger version) is what lets
        # `--ckpt_path last` find the previous run's last.ckpt.
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        for logger in _logger_configs(config.trainer.logger):
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and not init_args.save_dir:
                init_args.save_dir = str(root)
        # Evaluating a checkpoint: its weights replace the backbone's, so don't fetch them.
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            config.model.init_args.pretrained = False
            config.model.init_args.weights = None
        # Checkpoints are read without running pickled code, ours included (torch's default
        # since 2.6, but TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would flip it). LightningCLI 2.6
        # reads --ckpt_path's hyperparameters with weights_only=True whatever this says.
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        accelerator = config.trainer.get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise FinetuneError(
                f"trainer.accelerator: {accelerator}, but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                "is False); pass --trainer.accelerator cpu (or auto), or check the driver and torch's CUDA build"
            )
        ckpt_path = config.get("ckpt_path")
        local_file = ckpt_path and ckpt_path not in ("last", "best", "hpc") and ":" not in str(ckpt_path)
        if local_file and not Path(ckpt_path).is_file():
            raise FinetuneError(f"ckpt_path: {ckpt_path} is not a file; pass a .ckpt path, or `last` to resume")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer, with our progress bar by default, and Lightning's refusals of trainer
        settings (a strategy without its GPU or package, ...) as one line. (Strategies the
        freeze/unfreeze schedule cannot run under are refused in FinetuneTask.setup.)"""
        config = (self.config_init.get(self.subcommand) if self.subcommand else self.config_init)["trainer"]
        configured = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, LightningProgressBar) for c in configured):
            kwargs.setdefault("callbacks", [*configured, ProgressBar()])
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            raise FinetuneError(f"trainer: {str(err).strip().splitlines()[0]}") from err

    def fit(self, model, **kwargs) -> None:
        """`fit`, or with --lr_find (`finetune lr-find`) the LR range test instead."""
        if self.config.fit.get("lr_find"):
            run_lr_find(self.trainer, model, kwargs.get("datamodule"), self.config.fit.lr_find_steps)
            return
        if self.config.fit.get("batch_size_find"):
            run_batch_size_find(self.trainer, model, kwargs.get("datamodule"), self.config.fit.batch_size_find_trials)
        self._run_trainer(self.trainer.fit, model, **kwargs)

    def validate(self, model, **kwargs) -> None:
        self._run_trainer(self.trainer.validate, model, **kwargs)

    def test(self, model, **kwargs) -> None:
        self._run_trainer(self.trainer.test, model, **kwargs)

    def predict(self, model, **kwargs) -> None:
        self._run_trainer(self.trainer.predict, model, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (2.6) reads --ckpt_path once before the Trainer does, to take the model's
        # hyperparameters from it (torch.load(weights_only=True)); name the file if that fails.
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            message = unreadable_file_message("ckpt_path", path, err)
            if message is None:
                raise
            raise UnsafeFileError(message) from None

    def _run_trainer(self, method, model, **kwargs) -> None:
        """Trainer.fit/validate/..., with a refused or unreadable checkpoint named in one line
        (torch's own message is a paragraph that does not say which file)."""
        config = self.config[self.subcommand]
        compile = config.get("compile", False)
        apply_speed_settings(
            model, config.get("channels_last", False), compile, kwargs.get("datamodule"), config.get("compile_backend"),
        )
        if compile:
            self.trainer.callbacks.append(CompiledGraphs())
        try:
            method(model, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            path = self.trainer.ckpt_path or kwargs.get("ckpt_path")
            loading = isinstance(err, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in str(err)
            message = unreadable_file_message("ckpt_path", path, err) if path and loading else None
            if message is None:
                raise
            raise UnsafeFileError(message) from None

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero or self.config.fit.get("lr_find"):
            return
        metrics = self.trainer.callback_metrics
        shown = sorted(k for k in metrics if k.startswith("val/") and "_class/" not in k)  # per-class: in W&B
        print("final validation: " + "  ".join(f"{k} {metrics[k].item():.4f}" for k in shown))
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            print(f"best checkpoint: {checkpoint.best_model_path} ({checkpoint.monitor} {score.item():.4f})")


def create_cli(args=None, run: bool = True) -> FinetuneCLI:
    """The CLI object; tests call this in-process with `args` to skip ~10 s of imports."""
    return FinetuneCLI(
        FinetuneTask,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=run,
        save_config_kwargs={"overwrite": True},
        # Tasks build their own optimizer (param groups, no decay on norms): no CLI override.
        auto_configure_optimizers=False,
        trainer_defaults={"profiler": {"class_path": "finetune.speed.NoProfiler"}},
        parser_class=FinetuneArgumentParser,
        args=args,
    )


def run(args: list[str]) -> None:
    """fit / validate / test / predict / lr-find through LightningCLI, errors in one line."""
    if args[:1] == ["lr-find"]:  # `finetune lr-find ...` is `finetune fit --lr_find true ...`
        args = ["fit", "--lr_find", "true", *args[1:]]
    sys.argv[1:] = args  # not also as `args=`: LightningCLI warns when it gets both
    try:
        create_cli()
    except Exception as err:
        message = user_message(err)  # ours: one line naming the key; anything else: a traceback
        if message is None:
            raise
        log.debug("%s", message, exc_info=True)
        sys.exit(f"error: {message}")


def main() -> None:
    from finetune.commands import main as dispatch

    dispatch()


if __name__ == "__main__":
    main()
