"""The private Lightning attributes finetune uses (finetune/lightning_internals.py) still exist
and still mean what we use them for: fails loudly, naming the attribute, on a Lightning upgrade
that moves one."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import WandbLogger

from finetune import lightning_internals as internals

SOURCE = Path(internals.__file__)
PACKAGE = SOURCE.parent

# (object it is read on, dotted path): every private Lightning name lightning_internals.py uses,
# with the public path that leads to it. One test case each, so a failure names the attribute.
INTERNALS = [
    ("trainer", "_logger_connector.should_update_logs"),
    ("trainer", "_logger_connector.log_metrics"),
    ("trainer", "_signal_connector.received_sigterm"),
    ("trainer", "fit_loop.epoch_progress.current.started"),
    ("trainer", "fit_loop.epoch_progress.current.processed"),
    ("trainer", "fit_loop.epoch_loop.batch_progress.current.processed"),
    ("trainer", "fit_loop.epoch_loop._broadcast_sigterm_tensor"),  # Lightning >= 2.6 only
    ("checkpoint", "_save_checkpoint"),
    ("checkpoint", "_save_last_checkpoint"),
    ("checkpoint", "_monitor_candidates"),
    ("checkpoint", "_last_global_step_saved"),
    ("checkpoint", "_should_skip_saving_checkpoint"),
    ("checkpoint", "_should_save_on_train_epoch_end"),
    ("wandb_logger", "_experiment"),
]
PRIVATE = {part for _, path in INTERNALS for part in path.split(".") if part.startswith("_")}
OPTIONAL = {"_broadcast_sigterm_tensor": (2, 6)}  # used only where it exists


@pytest.fixture(scope="module")
def owners(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("internals")
    return {
        "trainer": L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp, log_every_n_steps=1),
        "checkpoint": ModelCheckpoint(dirpath=tmp),
        "wandb_logger": WandbLogger(save_dir=str(tmp), offline=True),
    }


def _version() -> tuple[int, int]:
    return tuple(int(part) for part in L.__version__.split(".")[:2])


@pytest.mark.parametrize("owner, path", INTERNALS, ids=[path.rsplit(".", 1)[-1] for _, path in INTERNALS])
def test_each_private_attribute_we_use_is_there(owner, path, owners):
    name = path.rsplit(".", 1)[-1]
    if name in OPTIONAL and _version() < OPTIONAL[name]:
        pytest.skip(f"{name} is new in Lightning {OPTIONAL[name]}")
    found = owners[owner]
    for step in path.split("."):
        assert hasattr(found, step), (
            f"Lightning {L.__version__}: {type(found).__name__}.{step} ({owner}.{path}) is gone; "
            "finetune/lightning_internals.py relies on it: find its replacement and update the module"
        )
        found = getattr(found, step)


def test_the_list_names_every_private_attribute_the_module_uses():
    """The cases above are the module's private names, no fewer (a new one gets its case)."""
    code = SOURCE.read_text()
    used = set(re.findall(r"\.(_[a-z]\w*)", code)) | set(re.findall(r"def (_[a-z]\w*)", code))
    assert used == PRIVATE


def test_no_other_module_touches_them():
    outside = {
        f"{file.relative_to(PACKAGE.parent)}: {name}"
        for file in PACKAGE.rglob("*.py") if file != SOURCE
        for name in PRIVATE if re.search(rf"\b{name}\b", file.read_text())
    }
    assert not outside, f"use finetune.lightning_internals instead: {sorted(outside)}"


def test_trainer_internals_mean_what_we_use_them_for(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, log_every_n_steps=1)
    assert internals.is_logging_step(trainer) is True  # no loop running: Lightning logs
    internals.log_now(trainer, {})  # no logger: nothing to write, and no error
    assert trainer.received_sigterm is False
    internals.request_stop(trainer)
    assert trainer.received_sigterm is True  # what Lightning's loops check to raise SIGTERMException
    internals.skip_sigterm_broadcast(trainer)
    if _version() >= OPTIONAL["_broadcast_sigterm_tensor"]:
        assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None
    assert internals.data_position(trainer) == (0, 0)


class Refusing(internals.CheckedModelCheckpoint):
    def before_write(self, trainer) -> None:
        raise RuntimeError("refused")


class Probe(L.Callback):
    """At the first step: what the ModelCheckpoint functions say and do mid-fit."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.seen: dict = {}

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != 1:
            return
        checkpoint, seen = self.checkpoint, self.seen
        seen["may_save_at_start"] = internals.may_save_now(checkpoint, trainer)
        internals.save_last(checkpoint, trainer, counts_as_saved=False)
        seen["last"] = checkpoint.last_model_path
        seen["may_save_after_uncounted"] = internals.may_save_now(checkpoint, trainer)
        internals.save_last(checkpoint, trainer)
        seen["may_save_after_counted"] = internals.may_save_now(checkpoint, trainer)
        with pytest.raises(RuntimeError, match="refused"):
            internals.save_last(Refusing(dirpath=checkpoint.dirpath, filename="other", save_last=True), trainer)


def test_checkpoint_internals_mean_what_we_use_them_for(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    probe = Probe(checkpoint)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=2, limit_val_batches=0, callbacks=[checkpoint, probe],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert probe.seen == {
        "may_save_at_start": True, "last": str(tmp_path / "last.ckpt"),
        "may_save_after_uncounted": True,  # a validation at this step could still save top-k
        "may_save_after_counted": False,
    }
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] >= 1  # a whole checkpoint was written
    assert internals.saves_at_train_epoch_end(checkpoint, trainer) is True  # no validation
    assert internals.saves_at_train_epoch_end(ModelCheckpoint(save_on_train_epoch_end=False), trainer) is False


class StubRun:
    finished_with = None

    def finish(self, exit_code: int) -> None:
        self.finished_with = exit_code


def test_wandb_logger_experiment_is_the_run_it_started(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # Lightning's offline logger sets it; restored after
    run = StubRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    internals.finish_wandb_run(logger, exit_code=0)  # no run started: nothing to finish, none started
    assert logger._experiment is None
    assert logger.experiment is run
    internals.finish_wandb_run(logger, exit_code=1)
    assert run.finished_with == 1 and logger._experiment is None
