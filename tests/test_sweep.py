"""configs/sweeps/classify.yaml: the command a W&B agent runs parses with our CLI, every value of
every parameter landing where the sweep means it to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.cli import create_cli

REPO = Path(__file__).resolve().parents[1]
SWEEP = yaml.safe_load((REPO / "configs" / "sweeps" / "classify.yaml").read_text())


def trial_values(spec: dict) -> list:
    return list(spec["values"]) if "values" in spec else [spec["min"], spec["max"]]


def agent_command(values: dict) -> list[str]:
    """What `wandb agent` runs for these values: W&B's own expansion of `command`."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    flags = create_sweep_command_args({"args": {name: {"value": value} for name, value in values.items()}})["args"]
    command = create_sweep_command(list(SWEEP["command"]))
    at = command.index("${args}")
    return command[:at] + flags + command[at + 1:]


@pytest.mark.parametrize("pick", [0, -1])
def test_every_sweep_parameter_parses_into_its_key(pick, monkeypatch, colour_folder):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DATA_ROOT", str(colour_folder))
    values = {name: trial_values(spec)[pick] for name, spec in SWEEP["parameters"].items()}
    command = agent_command(values)
    assert command[:2] == ["finetune", "fit"] and str(colour_folder) in command
    cli = create_cli(command[2:], run=False, instantiate=False)  # parse and check, build nothing
    for name, value in values.items():
        section, key = name.split(".")
        assert cli.config[section].init_args[key] == value, name
    assert SWEEP["metric"]["name"] == "val/acc" and SWEEP["early_terminate"]["type"] == "hyperband"
