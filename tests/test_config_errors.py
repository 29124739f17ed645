"""Config mistakes reach the user as one line that names the key and the fix, through the real
`finetune` entry point (in-process): no traceback, no jsonargparse usage wall."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import hub
from finetune.cli import create_cli
from finetune.commands import main
from finetune.errors import lightning_refusal, one_line_errors

REPO = Path(__file__).resolve().parents[1]


def base_args(data: Path, run: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(data), "--data.image_size", "32",
        "--data.num_workers", "0", "--model.pretrained", "false", "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(run),
    ]


def user_error(monkeypatch, capsys, subcommand: str, data: Path, run: Path, *extra: str) -> str:
    """What `finetune <subcommand> ...` shows the user when it fails: exactly one line."""
    monkeypatch.setattr(sys, "argv", ["finetune", subcommand, *base_args(data, run), *extra])
    with pytest.raises(SystemExit) as exit_:
        main()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-2000:]
    if isinstance(exit_.value.code, str):  # sys.exit(message): Python prints it to stderr
        message = exit_.value.code
    else:  # a parse error, printed by the parser, exit status 2
        assert exit_.value.code == 2
        message = stderr.strip().splitlines()[-1]
    assert "\n" not in message and message.startswith("error: "), message
    return message.removeprefix("error: ")


@pytest.fixture(scope="module")
def two_classes(colour_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_classes")
    for split in ("train", "val"):
        for name in ("green", "red"):
            shutil.copytree(colour_folder / split / name, root / split / name)
    return root


@pytest.fixture(scope="module")
def three_class_checkpoint(colour_folder, tmp_path_factory) -> Path:
    """A checkpoint as the CLI writes it (hyperparameters included), of a 3-class resnet18."""
    run = tmp_path_factory.mktemp("three_classes")
    cli = create_cli(base_args(colour_folder, run), run=False)
    cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
    cli.trainer.save_checkpoint(run / "three.ckpt")
    return run / "three.ckpt"


@pytest.mark.parametrize("extra, expected", [
    (["--model.backbone", "resnet5"], "model.backbone: unknown timm model 'resnet5'; close matches: resnet50"),
    (["--model.finetuning", '{"strategy": "gradul"}'],
     "model.finetuning: 'gradul' is not one of none, frozen, freeze_then_unfreeze, gradual; did you mean 'gradual'?"),
    (["--model.scheduler", "cosin"], "model.scheduler: 'cosin' is not one of cosine, poly,"),
    (["--trainer.max_epochs", "ten"], "trainer.max_epochs: expected int (got 'ten')"),
    (["--checkpoint.save_last_every_n_train_steps", "0"], "checkpoint.save_last_every_n_train_steps: 0 is not a"),
    (["--model.mixup_prob", "3"], "model.mixup_prob: 3.0 is out of range; the chance a batch is mixed"),
    (["--model.class_weights", "[1, 2]"], "model.class_weights: 2 weights for 3 classes; pass one a class, or auto"),
    (["--trainer.callbacks+=finetune.callbacks.EMA", "--trainer.callbacks.decay", "2"],
     "trainer.callbacks: EMA decay 2.0 is out of range"),
    (["--data.augment", "randaug"], "data.augment: 'randaug' is not one of light, randaugment"),
], ids=["backbone", "strategy", "scheduler", "type", "step_saves", "mixup_prob", "class_weights", "ema_decay", "augment"])
def test_bad_values_are_one_line_naming_the_key(extra, expected, colour_folder, tmp_path, monkeypatch, capsys):
    assert user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, *extra).startswith(expected)


def test_missing_data_root(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-folder"
    message = user_error(monkeypatch, capsys, "fit", missing, tmp_path)
    assert message.startswith(f"data.root: {missing} is not a folder; point it at")


def test_missing_checkpoint_file(colour_folder, tmp_path, monkeypatch, capsys):
    message = user_error(monkeypatch, capsys, "validate", colour_folder, tmp_path, "--ckpt_path", "runs/x/last.ckpt")
    assert message == "ckpt_path: runs/x/last.ckpt is not a file; pass a .ckpt path, or `last` to resume"


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_checkpoint_with_other_classes_than_the_data(
    subcommand, three_class_checkpoint, two_classes, tmp_path, monkeypatch, capsys
):
    message = user_error(monkeypatch, capsys, subcommand, two_classes, tmp_path, "--ckpt_path", str(three_class_checkpoint))
    assert message == (
        f"ckpt_path: {three_class_checkpoint} was trained on 3 classes (blue, green, red), but data.root has 2 "
        f"(green, red); point --data.root at data with the same classes, or fine-tune a new head from it with "
        f"--model.weights {three_class_checkpoint} (and no --ckpt_path)"
    )


def test_weights_from_a_checkpoint_with_another_head_start_a_new_head(three_class_checkpoint, two_classes, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        cli = create_cli([*base_args(two_classes, tmp_path), "--model.weights", str(three_class_checkpoint)], run=False)
    assert cli.model.net.head(torch.zeros(1, cli.model.backbone.num_features, 1, 1)).shape == (1, 2)
    saved = torch.load(three_class_checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(cli.model.backbone.conv1.weight, saved["net.backbone.conv1.weight"])
    assert "its backbone is loaded, its head is not" in caplog.text


@pytest.mark.parametrize("tensors, expected", [
    # a bottleneck ResNet's (resnet50) 1x1 conv where resnet18 has a 3x3 one
    ({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
     ("layer1.0.conv1.weight in {path} has shape (64, 64, 1, 1), the backbone expects (64, 64, 3, 3); "
      "the file is for a different model variant")),
    ({"encoder.layers.0.weight": torch.zeros(4, 4), "encoder.layers.0.bias": torch.zeros(4)},
     "no tensor in {path} matches the backbone's keys (e.g. 'conv1.weight'); is it weights for another architecture?"),
], ids=["other_variant", "other_architecture"])
def test_weights_for_another_architecture(tensors, expected, colour_folder, tmp_path, monkeypatch, capsys):
    path = tmp_path / "weights.pth"
    torch.save(tensors, path)
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--model.weights", str(path))
    assert message == "model.weights: " + expected.format(path=path)


def test_gpu_config_without_a_gpu(colour_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also true here; says so on a GPU machine
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--trainer.accelerator", "gpu")
    assert message.startswith("trainer.accelerator: gpu, but this machine has no usable CUDA GPU")
    assert "--trainer.accelerator cpu" in message


def test_strategy_lightning_refuses_is_one_line(colour_folder, tmp_path, monkeypatch, capsys):
    # base_args ask for the CPU, where Lightning refuses FSDP; with a GPU check_strategy refuses it
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--trainer.strategy", "fsdp")
    assert message.startswith("trainer.strategy: The strategy `fsdp` requires a GPU accelerator")


def test_strategies_the_schedule_cannot_run_under_fail_at_start():
    """FSDP shards the parameters and DeepSpeed owns the gradients: the gradients of stages
    unfrozen late would not be averaged across processes. One line, before any step."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    from finetune.distributed import check_strategy
    from finetune.errors import FinetuneError, user_message

    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy("cpu"))
    with pytest.raises(FinetuneError) as refused:
        check_strategy(FSDPStrategy())
    message = user_message(refused.value)
    assert message.startswith("trainer.strategy: FSDPStrategy is not supported") and "ddp" in message
    assert "\n" not in message


# ---- first-run mistakes, by category (issue 17, item 8) ----------------------------------------

def test_pretrained_weights_offline(colour_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "cached_weights_file", lambda hf_hub_id: None)  # whatever this machine has cached
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--model.pretrained", "true")
    assert message == (
        "model.pretrained: weights for resnet18 are not cached and HF_HUB_OFFLINE is set; pass a local file with "
        "`--model.weights /path/to/resnet18.safetensors` (.pth/.ckpt work too) or train from scratch with "
        "`--model.pretrained false`"
    )


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.max_epochs", "-3"], "trainer.max_epochs: `max_epochs` must be a non-negative integer or -1"),
    (["--trainer.limit_train_batches", "-1"], "trainer.limit_train_batches: You have passed invalid value -1"),
    (["--trainer.devices", "0"], "trainer.devices: `Trainer(devices='0')` value is not a valid input"),
    (["--trainer.precision", "16-mix"], "trainer.precision: '16-mix' is not one of 64, 32, 16, transformer-engine"),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: 0 is out of range; batches per"),
    (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch: 0 is out of range; pass 1"),
    # refused by Lightning once fit has started, through the task's own setup (no traceback either)
    (["--trainer.val_check_interval", "1000"], "trainer.val_check_interval: `val_check_interval` (1000) must be"),
    (["--data.batch_size", "0"], "data.batch_size: 0 is out of range; images per step and device: pass a positive"),
    (["--data.num_workers", "-1"], "data.num_workers: -1 is out of range; loader processes: pass 0"),
    (["--data.image_size", "-5"], "data.image_size: -5 is out of range; input side in pixels"),
    (["--model.lr", "-1"], "model.lr: -1.0 is out of range; the learning rate: pass a positive number"),
    (["--model.dropout", "2"], "model.dropout: 2.0 is out of range; a probability"),
], ids=["max_epochs", "limit_train_batches", "devices", "precision", "accumulate", "check_val", "val_check_interval",
        "batch_size", "num_workers", "image_size", "lr", "dropout"])
def test_invalid_trainer_data_and_model_values(extra, expected, colour_folder, tmp_path, monkeypatch, capsys):
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, *extra)
    assert message.startswith(expected), message


@pytest.mark.parametrize("key", ["--model.weights", "--ckpt_path"])
def test_wrong_file_given_as_weights_or_checkpoint(key, colour_folder, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not weights\n")
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, key, str(notes))
    assert message.startswith(f"{key.removeprefix('--')}: {notes} is not a PyTorch file"), message


def test_missing_checkpoint_when_resuming(colour_folder, tmp_path, monkeypatch, capsys):
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--ckpt_path", "nope.ckpt")
    assert message == "ckpt_path: nope.ckpt is not a file; pass a .ckpt path, or `last` to resume"


def test_missing_config_file(colour_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = user_error(monkeypatch, capsys, "fit", colour_folder, tmp_path, "--config", "nope.yaml")
    assert message == (
        f"config: {tmp_path / 'nope.yaml'} does not exist; pass the path of a YAML config, e.g. configs/quickstart.yaml"
    )


def test_check_data_parse_errors_are_one_line_too(colour_folder, tmp_path, monkeypatch, capsys):
    message = user_error(monkeypatch, capsys, "check-data", colour_folder, tmp_path, "--model.scheduler", "cosin")
    assert message.startswith("model.scheduler: 'cosin' is not one of cosine")


def test_bugs_keep_their_traceback(colour_folder, tmp_path, monkeypatch):
    """Only user errors become one line: an error raised by our code, even a ValueError, is a bug."""
    def broken(*args, **kwargs):
        raise ValueError("a bug in the task")

    monkeypatch.setattr("finetune.tasks.base.FinetuneTask.configure_optimizers", broken)
    monkeypatch.setattr(sys, "argv", ["finetune", "fit", *base_args(colour_folder, tmp_path)])
    with pytest.raises(ValueError, match="a bug in the task"):
        main()


def test_lightning_refusals_are_told_from_bugs():
    """A setting Lightning refuses is one line; the same error raised by our code, or by
    Lightning because project code called it wrongly, is a bug."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities import rank_zero_only

    def refusal(call):
        with pytest.raises(Exception) as caught:
            call()
        return lightning_refusal(caught.value, {"trainer": ["limit_train_batches"]})

    def build_trainer():
        Trainer(limit_train_batches=-1, logger=False)

    def our_bug():
        raise ValueError("limit_train_batches in a message of ours")

    assert str(refusal(build_trainer)).startswith("trainer.limit_train_batches: You have passed invalid value -1")
    assert refusal(our_bug) is None
    assert refusal(lambda: rank_zero_only(build_trainer)()) is None  # Lightning -> project code -> Lightning
    with pytest.raises(KeyError), one_line_errors():  # not a user error: raised as it is
        raise KeyError("bug")


def test_readme_own_images_command_offline_and_without_gpu(tmp_path):
    """README: `finetune fit --config configs/classify.yaml --data.root DIR`, as a new user runs
    it, without a network (and here without a GPU): one line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [Path(sys.executable).parent / "finetune", "fit", "--config", str(REPO / "configs" / "classify.yaml"),
         "--data.root", str(REPO / "data" / "fashion-mnist-sample"), "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = "error: model.pretrained: weights for resnet50.tv2_in1k are not cached and HF_HUB_OFFLINE is set"
    if not torch.cuda.is_available():
        expected = "error: trainer.accelerator: gpu, but this machine has no usable CUDA GPU"
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-3000:]
