"""The whole resolved config in every logger (W&B: the run's config), not only the model's
hyperparameters: trainer, data, checkpoint, callbacks and the command line that ran it."""

from __future__ import annotations

import json
import shlex

from lightning.pytorch.cli import SaveConfigCallback


class LoggedConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback (config.yaml in the log folder, as before), which also
    logs the config as a nested dict through every logger's `log_hyperparams`.

    `command_line`: the arguments the CLI parsed, logged as `command` (a shell line that
    reruns the run with `finetune`)."""

    def __init__(self, *args, command_line: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.command_line = command_line

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not getattr(trainer, "enable_autolog_hparams", True):  # the Trainer's off switch (Lightning >= 2.5)
            return
        # None values kept: an unset value is part of what ran (Lightning's config.yaml keeps them
        # too). Positional: jsonargparse renamed the flag (skip_none, 4.49: skip_unset).
        config = json.loads(self.parser.dump(self.config, "json", False))
        if self.command_line is not None:
            config["command"] = shlex.join(["finetune", *self.command_line])
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
