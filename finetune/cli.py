"""`finetune fit | validate | test | predict --config configs/<name>.yaml` (LightningCLI)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Set before albumentations is imported anywhere: its update check goes to the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from finetune.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from finetune.callbacks.embedding import EmbeddingWriter  # noqa: E402
from finetune.callbacks.predictions import PredictionCSVWriter  # noqa: E402
from finetune.lr_find import run_lr_find  # noqa: E402
from finetune.tasks.base import FinetuneTask  # noqa: E402

log = logging.getLogger("finetune")


def _logger_configs(logger_cfg) -> list:
    if logger_cfg in (None, True, False):
        return []
    return list(logger_cfg) if isinstance(logger_cfg, list) else [logger_cfg]


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
        parser.add_argument(
            "--lr_find", type=bool, default=False,
            help="fit only: run the LR range test (Lightning Tuner), print and plot the suggestion, then stop",
        )
        parser.add_argument("--lr_find_steps", type=int, default=100, help="training steps the LR range test takes")
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

    def fit(self, model, **kwargs) -> None:
        """`fit`, or with --lr_find (`finetune lr-find`) the LR range test instead."""
        if self.config.fit.get("lr_find"):
            run_lr_find(self.trainer, model, kwargs.get("datamodule"), self.config.fit.lr_find_steps)
            return
        self.trainer.fit(model, **kwargs)

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
        args=args,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if args[:1] == ["search"]:  # nearest neighbours from saved embeddings: no model, no Trainer
        from finetune.search import main as search_main

        return search_main(args[1:])
    if args[:1] == ["lr-find"]:  # `finetune lr-find ...` is `finetune fit --lr_find true ...`
        args = ["fit", "--lr_find", "true", *args[1:]]
    create_cli(args)


if __name__ == "__main__":
    main()
