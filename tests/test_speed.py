"""GPU speed settings, exercised on CPU: torch.compile, channels_last, the batch-size finder,
and no per-step host syncs in our LightningModules."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from finetune.cli import create_cli
from finetune.data.classification import ImageFolderDataModule
from finetune.speed import apply_speed_settings
from finetune.tasks.classification import ClassificationTask

REPO = Path(__file__).resolve().parents[1]


def tiny(colour_folder, **task_kwargs):
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=24, batch_size=16, num_workers=0)
    task = ClassificationTask(
        num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", pretrained=False, lr=3e-3,
        **task_kwargs,
    )
    return dm, task


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_compiled_model_trains_and_keeps_its_parameter_names(colour_folder, tmp_path, monkeypatch):
    import torch._dynamo

    import finetune.models.classifier as classification
    from finetune.backbones import create_backbone

    # timm's resnet18 layout at toy width (1 block per stage): compiling it takes seconds, not minutes.
    monkeypatch.setattr(
        classification, "create_backbone", partial(create_backbone, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8),
    )
    torch._dynamo.reset()
    L.seed_everything(0)
    dm, task = tiny(colour_folder)
    dm.hparams.batch_size = 24  # one train and one val batch shape: two compilations, not four
    names = list(task.state_dict())
    apply_speed_settings(task, compile=True, compile_backend="aot_eager")  # autograd traced; no C++ build
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    fit = trainer(tmp_path, max_epochs=6)
    fit.fit(task, dm)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames, "the backbone never ran compiled"
    assert fit.callback_metrics["val/acc"] >= 0.9  # chance is 0.33
    assert list(task.state_dict()) == names  # checkpoints stay loadable without compile


@pytest.mark.parametrize("strategy", ["none", "frozen", "freeze_then_unfreeze", "gradual"])
def test_compiled_backbone_stays_compiled_through_every_schedule(colour_folder, tmp_path, monkeypatch, strategy):
    """Every unfreeze recompiles (dynamo guards on requires_grad); `gradual` used to pass the
    recompile limit in epoch 3 and run uncompiled from then on."""
    import torch._dynamo

    import finetune.models.classifier as classification
    from finetune.backbones import create_backbone
    from finetune.compile import GRAPHS_PER_PHASE, CompiledGraphs, compile_backbone, schedule_phases

    monkeypatch.setattr(
        classification, "create_backbone", partial(create_backbone, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8),
    )
    torch._dynamo.reset()
    L.seed_everything(0)
    schedule = {"strategy": strategy, "unfreeze_at": [1, 1, 2, 2] if strategy == "gradual" else [1]}
    dm, task = tiny(colour_folder, finetuning=schedule)
    dm.hparams.batch_size = 20  # train batches 20, 20, 8 and val 20, 4: shape changes recompile too
    limit = compile_backbone(task, backend="eager")
    graphs = CompiledGraphs()
    fit = trainer(tmp_path, max_epochs=3, callbacks=[graphs])
    fit.fit(task, dm)
    assert graphs.uncompiled == 0, "the backbone fell back to eager"
    assert schedule_phases(task) <= graphs.graphs <= limit and fit.callback_metrics["compile/graphs"] == graphs.graphs
    if strategy == "gradual":  # 3 phases: more graphs than dynamo's default limit allows one function
        assert graphs.graphs > GRAPHS_PER_PHASE


def test_channels_last_weights_and_inputs_give_the_same_outputs(colour_folder, tmp_path):
    L.seed_everything(0)
    dm, task = tiny(colour_folder)
    dm.setup("fit")
    images = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)["image"]
    reference = task.eval()(images)
    apply_speed_settings(task, channels_last=True)
    conv = task.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(task(images.contiguous(memory_format=torch.channels_last)), reference, atol=1e-4, rtol=1e-4)
    layouts = []  # what the first conv receives during training
    task.backbone.conv1.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(task.train(), dm)
    assert layouts and all(layouts)


def test_batch_size_finder_doubles_from_the_configured_size(colour_folder, tmp_path, capsys):
    cli = create_cli([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--data.root", str(colour_folder), "--data.image_size", "24", "--data.batch_size", "4",
        "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--batch_size_find", "true", "--batch_size_find_trials", "3",  # 4, 8, 16
    ])
    assert "batch size: 16 (tried up to 3 sizes from 4" in capsys.readouterr().out
    assert cli.datamodule.hparams.batch_size == 16
    assert cli.trainer.train_dataloader.batch_size == 16  # the fit itself used it
    assert cli.trainer.current_epoch == 1  # and then trained


def test_steady_training_steps_make_no_host_syncs(colour_folder, tmp_path, monkeypatch):
    """From the end of one training batch to the end of the next (the data fetch,
    on_after_batch_transfer, forward, backward, the optimizer, our callbacks, the progress bar
    and Lightning's own loop) nothing reads a tensor on the host except on the steps the
    loggers write: on a GPU each read stalls the queue. HostSyncRecorder records the reads that
    would sync (`.item()`, `float(t)`, `if t:`, `.cpu()`, boolean masks, `nonzero`)."""
    from test_cli import small_run

    from finetune.callbacks.nonfinite import NonFiniteGuard
    from finetune.callbacks.progress import ProgressBar
    from finetune.host_syncs import HostSyncRecorder

    monkeypatch.setattr(NonFiniteGuard, "cpu_checks_every_step", False)  # as on a GPU: logging steps only
    cli = create_cli(small_run(
        colour_folder, tmp_path, "--data.batch_size", "4", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "4",
        "--trainer.enable_progress_bar", "true", "--trainer.logger", "false",
    ), run=False)
    assert isinstance(cli.trainer.progress_bar_callback, ProgressBar)
    recorder = HostSyncRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert recorder.steps >= 8  # 2 epochs of 12 steps, less logging steps, their neighbours, epoch ends
    assert not recorder.syncs, "host syncs in training steps:\n" + "\n".join(sorted(set(recorder.syncs)))


def test_host_sync_recorder_finds_a_sync(colour_folder, tmp_path):
    """The recorder itself: a loss read on the host in every step is found, with its line."""

    class ReadsTheLoss(ClassificationTask):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.last_loss = loss.item()
            return loss

    from finetune.host_syncs import HostSyncRecorder

    dm, _ = tiny(colour_folder)
    task = ReadsTheLoss(num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", pretrained=False)
    recorder = HostSyncRecorder()
    trainer(tmp_path, max_epochs=1, limit_val_batches=0, log_every_n_steps=50, callbacks=[recorder]).fit(task, dm)
    assert recorder.steps == 1 and recorder.syncs == ["tests/test_speed.py:{} self.last_loss = loss.item()".format(
        ReadsTheLoss.training_step.__code__.co_firstlineno + 2)]


def test_fast_hook_name_attribute_keeps_module_semantics(colour_folder, tmp_path):
    """The tasks set Lightning's `_current_fx_name` as a plain attribute (a fast path around
    nn.Module.__setattr__): hooks still see their own name, so `self.log` is checked and
    routed per hook, and every other attribute still registers as a module or parameter."""
    seen: dict[str, str] = {}

    class Recording(ClassificationTask):
        def training_step(self, batch, batch_idx):
            seen["training_step"] = self._current_fx_name
            return super().training_step(batch, batch_idx)

        def on_train_batch_start(self, batch, batch_idx):
            seen["on_train_batch_start"] = self._current_fx_name
            return super().on_train_batch_start(batch, batch_idx)

    dm, _ = tiny(colour_folder)
    task = Recording(num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", pretrained=False)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    fit.fit(task, dm)
    assert seen == {"training_step": "training_step", "on_train_batch_start": "on_train_batch_start"}
    assert "val/acc" in fit.callback_metrics and "train/loss_epoch" in fit.callback_metrics
    assert "_current_fx_name" in vars(task) and "_current_fx_name" not in task._modules

    task.extra = torch.nn.Linear(2, 2)
    task.scale = torch.nn.Parameter(torch.ones(1))
    assert "extra" in task._modules and "scale" in task._parameters
    assert {"extra.weight", "scale"} <= set(task.state_dict())


def test_cli_profiles_nothing_by_default_and_still_takes_a_profiler(colour_folder, tmp_path):
    """The CLI's default profiler (finetune.speed.NoProfiler) skips the per-hook context
    managers of Lightning's do-nothing default; `--trainer.profiler simple` still profiles."""
    from lightning.pytorch.profilers import SimpleProfiler
    from test_cli import small_run

    from finetune.speed import NoProfiler

    def fit(*extra):
        return create_cli(["fit", *small_run(
            colour_folder, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--trainer.logger", "false", *extra,
        )])

    cli = fit()
    assert isinstance(cli.trainer.profiler, NoProfiler) and cli.trainer.global_step == 3
    profiled = fit("--trainer.profiler", "simple")
    assert isinstance(profiled.trainer.profiler, SimpleProfiler)
    assert any("training_step" in action for action in profiled.trainer.profiler.recorded_durations)
