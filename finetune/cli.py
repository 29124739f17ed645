"""`finetune fit | validate | test | predict --config configs/<name>.yaml` (LightningCLI).

The parser, the config's defaults and checks, the Trainer around the task; `create_cli` builds
it for `finetune` (finetune.commands, the entry point), `finetune check-data` and the notebooks.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

# Set before albumentations is imported anywhere: its update check goes to the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from finetune.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from finetune.callbacks.interruption import Interruption  # noqa: E402
from finetune.callbacks.logged_config import LoggedConfig  # noqa: E402
from finetune.callbacks.nonfinite import NonFiniteGuard  # noqa: E402
from finetune.callbacks.predictions import PredictionWriter  # noqa: E402
from finetune.callbacks.progress import ProgressBar  # noqa: E402
from finetune.callbacks.report import RunReport  # noqa: E402
from finetune.callbacks.wandb_run import WandbRunId, continue_wandb_run  # noqa: E402
from finetune.compile import CompiledGraphs  # noqa: E402
from finetune.contract import contract_of  # noqa: E402
from finetune.errors import (  # noqa: E402
    FinetuneError,
    UnsafeFileError,
    condense_parse_error,
    lightning_refusals_named,
    unreadable_file_message,
)
from finetune.lr_find import run_lr_find  # noqa: E402
from finetune.speed import apply_speed_settings, run_batch_size_find  # noqa: E402
from finetune.tasks.base import FinetuneTask  # noqa: E402
from finetune.value_checks import check_values  # noqa: E402

log = logging.getLogger("finetune")


def _logger_configs(logger_cfg) -> list:
    if logger_cfg in (None, True, False):
        return []
    return list(logger_cfg) if isinstance(logger_cfg, list) else [logger_cfg]


class FinetuneArgumentParser(LightningArgumentParser):
    """A parse error as one line naming the key (`model.scheduler: 'cosin' is not one of ...`)
    instead of ~100 lines of usage and jsonargparse's nested Union report.
    JSONARGPARSE_DEBUG=true shows the full report."""

    def error(self, message, *args, **kwargs):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, *args, **kwargs)
        sys.stderr.write(f"error: {condense_parse_error(str(message))}\n")
        self.exit(2)


class FinetuneCLI(LightningCLI):
    """LightningCLI with our sections and defaults. `instantiate=False`: parse and check the
    config only (`check-data` builds the DataModule itself); `extra_arguments(parser)` adds a
    command's own flags (`check-data --json`)."""

    def __init__(self, *args, instantiate: bool = True, extra_arguments: Callable | None = None, **kwargs):
        self.instantiate = instantiate
        self.extra_arguments = extra_arguments
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks get their own config section (`checkpoint.*`, `predictions.*`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            # None: the metric and mode of the task's contract (before_instantiate_classes)
            "checkpoint.monitor": None,
            "checkpoint.mode": None,
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:02d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # the task's writer, by its contract
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")  # stop at a NaN/inf loss
        parser.add_lightning_class_args(Interruption, "interruption")  # SIGTERM/Ctrl+C: save, exit
        parser.add_lightning_class_args(RunReport, "report")  # curves and figures as files: runs/<name>/report/
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
        if self.extra_arguments is not None:
            self.extra_arguments(parser)

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, without its warning that `args` and sys.argv both hold arguments
        (`finetune` passes its own, sys.argv also has the command's name), then --ckpt_path
        checked before Lightning reads its hyperparameters. The arguments go to the loggers
        with the config (LoggedConfig)."""
        self.config = parser.parse_args(args)
        command_line = sys.argv[1:] if args is None else args
        if isinstance(command_line, list) and self.save_config_callback is LoggedConfig:
            self.save_config_kwargs = {**self.save_config_kwargs, "command_line": [str(a) for a in command_line]}
        subcommand = self.config.get("subcommand")
        if subcommand:
            refuse_unreadable_checkpoint(self.config[subcommand].get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        if not self.instantiate:
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_values(config)
        _monitor_from_contract(config)
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
        if self.subcommand == "fit":
            continue_wandb_run(config, _logger_configs(config.trainer.logger), refuse_unreadable_checkpoint)

    def instantiate_classes(self) -> None:
        if self.instantiate:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer, with our progress bar by default, and Lightning's refusals of trainer
        settings (a strategy without its GPU or package, ...) as one line. (Strategies the
        freeze/unfreeze schedule cannot run under are refused in FinetuneTask.setup.)"""
        config = (self.config_init.get(self.subcommand) if self.subcommand else self.config_init)["trainer"]
        configured = list(config.get("callbacks") or [])
        # The W&B run's id in every checkpoint (a no-op without a WandbLogger): a resumed fit
        # and `finetune export` log into the run that trained the model.
        always_on = [WandbRunId()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, LightningProgressBar) for c in configured):
            always_on.append(ProgressBar())
        kwargs.setdefault("callbacks", [*configured, *always_on])
        with lightning_refusals_named({"trainer": TRAINER_ARGUMENTS}):
            return super().instantiate_trainer(**kwargs)

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

    def _run_trainer(self, method, model, **kwargs) -> None:
        """Trainer.fit/validate/..., with a refused or unreadable checkpoint named in one line
        (torch's own message is a paragraph that does not say which file), and a setting
        Lightning refuses once it starts (val_check_interval > batches, ...) too."""
        config = self.config[self.subcommand]
        compile = config.get("compile", False)
        apply_speed_settings(
            model, config.get("channels_last", False), compile, kwargs.get("datamodule"), config.get("compile_backend"),
        )
        if compile:
            self.trainer.callbacks.append(CompiledGraphs())
        try:
            with lightning_refusals_named({"trainer": TRAINER_ARGUMENTS, "checkpoint": CHECKPOINT_ARGUMENTS}):
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
            # ddp_spawn hands back the best path from the workers, not the score.
            score = checkpoint.best_model_score
            shown = "" if score is None else f" ({checkpoint.monitor} {score.item():.4f})"
            print(f"best checkpoint: {checkpoint.best_model_path}{shown}")


TRAINER_ARGUMENTS = list(inspect.signature(L.Trainer.__init__).parameters)[1:]
CHECKPOINT_ARGUMENTS = list(inspect.signature(ModelCheckpoint.__init__).parameters)[1:]


def _monitor_from_contract(config) -> None:
    """An unset checkpoint.monitor / checkpoint.mode: the metric and mode the task's contract
    names (classification val/acc, segmentation val/miou, ...)."""
    checkpoint = config.checkpoint
    if checkpoint.monitor is not None and checkpoint.mode is not None:
        return
    try:
        contract = contract_of(config.model.class_path)
    except TypeError:
        raise FinetuneError(
            f"checkpoint.monitor: {config.model.class_path} declares no contract to take the metric from; "
            "pass --checkpoint.monitor and --checkpoint.mode"
        ) from None
    checkpoint.monitor = checkpoint.monitor or contract.monitor
    checkpoint.mode = checkpoint.mode or contract.mode


def refuse_unreadable_checkpoint(path) -> None:
    """UnsafeFileError naming `path` when torch.load(weights_only=True) refuses it or cannot read
    it. Lightning (2.6) then reads the file for the model's hyperparameters, the Trainer for the
    weights: this first read maps the tensors (mmap) instead of reading them."""
    if not path or not Path(path).is_file():
        return  # `last`, or no such file: before_instantiate_classes says which
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # unpickling raises many types; those unreadable_file_message does not name are raised
        message = unreadable_file_message("ckpt_path", path, err)
        if message is None:
            raise
        raise UnsafeFileError(message) from None


def create_cli(
    args: list[str] | None = None, run: bool = True, *, instantiate: bool = True, extra_arguments: Callable | None = None,
) -> FinetuneCLI:
    """The CLI object; tests and notebooks call this in-process with `args` (None: sys.argv[1:])
    to skip ~10 s of imports. `instantiate`, `extra_arguments`: see FinetuneCLI."""
    return FinetuneCLI(
        FinetuneTask,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=run,
        # config.yaml in the log folder, and the whole config in every logger (W&B: the run's config).
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        # Tasks build their own optimizer (param groups, no decay on norms): no CLI override.
        auto_configure_optimizers=False,
        trainer_defaults={"profiler": {"class_path": "finetune.speed.NoProfiler"}},
        parser_class=FinetuneArgumentParser,
        args=args,
        instantiate=instantiate,
        extra_arguments=extra_arguments,
    )


def run(args: list[str]) -> None:
    """fit / validate / test / predict / lr-find through LightningCLI (`finetune` ARGS)."""
    if args[:1] == ["lr-find"]:  # `finetune lr-find ...` is `finetune fit --lr_find true ...`
        args = ["fit", "--lr_find", "true", *args[1:]]
    create_cli(args)
