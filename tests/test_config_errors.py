"""Config mistakes reach the user as one line that names the key and the fix, through the real
`finetune` entry point (in-process): no traceback, no jsonargparse usage wall."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finetune.cli import create_cli, main

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
], ids=["backbone", "strategy", "scheduler", "type", "step_saves"])
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
    assert cli.model.head(torch.zeros(1, cli.model.backbone.num_features, 1, 1)).shape == (1, 2)
    saved = torch.load(three_class_checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(cli.model.backbone.conv1.weight, saved["backbone.conv1.weight"])
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
    assert message.startswith("trainer: The strategy `fsdp` requires a GPU accelerator")


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
