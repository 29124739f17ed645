"""Local weight files as they come in the wild: wrapped, prefixed, with an old classifier."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from finetune.backbones import create_backbone


@pytest.fixture(scope="module")
def torchvision_resnet50():
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, 768)  # someone's 768-way fine-tune
    with torch.no_grad():  # make BN buffers non-default so that loading them is visible
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    return model


def assert_same_backbone(backbone, reference):
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], msg=name)


def test_prefixed_torchvision_checkpoint_with_wide_classifier(tmp_path, torchvision_resnet50, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    path = tmp_path / "wild.pth"
    wrapped = {"epoch": 90, "state_dict": {f"module.pre.{k}": v for k, v in torchvision_resnet50.state_dict().items()}}
    torch.save(wrapped, path)
    backbone = create_backbone("resnet50", weights=str(path))
    assert_same_backbone(backbone, torchvision_resnet50)
    assert "prefix 'module.pre.' stripped" in caplog.text
    assert "module.pre.fc.weight" in caplog.text  # reported as the dropped classifier


def test_safetensors_without_prefix(tmp_path, torchvision_resnet50):
    path = tmp_path / "plain.safetensors"
    save_file(torchvision_resnet50.state_dict(), str(path))
    assert_same_backbone(create_backbone("resnet50", weights=str(path)), torchvision_resnet50)


def test_lightning_checkpoint_of_another_task(tmp_path, torchvision_resnet50, caplog):
    """Our own .ckpt layout: backbone.* beside head.*; the head's keys are reported, not loaded."""
    state = {f"backbone.{k}": v for k, v in torchvision_resnet50.state_dict().items() if not k.startswith("fc.")}
    state["head.classifier.1.weight"] = torch.zeros(5, 2048)
    path = tmp_path / "task.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.1}, "optimizer_states": []}, path)
    assert_same_backbone(create_backbone("resnet50", weights=str(path)), torchvision_resnet50)
    assert "head.classifier.1.weight" in caplog.text


def test_shape_mismatch_names_the_tensor(tmp_path, torchvision_resnet50):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_resnet50.state_dict(), path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight .* has shape \(64, 64, 1, 1\)") as err:
        create_backbone("wide_resnet50_2", weights=str(path))
    assert "\n" not in str(err.value)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="no tensor .* matches"):
        create_backbone("resnet18", weights=str(path))


def test_missing_and_pickled_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights: .*missing.pth does not exist"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    path = tmp_path / "pickled.pth"
    torch.save({"model": torchvision.models.resnet18(weights=None)}, path)  # a whole pickled module
    with pytest.raises(ValueError, match="re-save it"):
        create_backbone("resnet18", weights=str(path))


def test_weights_win_over_pretrained_and_need_no_network(tmp_path, torchvision_resnet50):
    path = tmp_path / "local.pth"
    torch.save(torchvision_resnet50.state_dict(), path)
    backbone = create_backbone("resnet50", pretrained=True, weights=str(path))
    assert_same_backbone(backbone, torchvision_resnet50)


# -- training checkpoints of timm's train.py and torchvision's reference scripts ---------------

class NotPlain:
    """A class no checkpoint format needs: its presence must still refuse the file."""


def _noisy(state: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + torch.rand(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}


def test_timm_train_checkpoint_loads_its_ema_weights(tmp_path, caplog):
    import argparse

    import timm

    model = timm.create_model("resnet18", num_classes=7)
    raw, ema = _noisy(model.state_dict(), 0), _noisy(model.state_dict(), 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 12, "arch": "resnet18", "state_dict": raw, "optimizer": optimizer.state_dict(), "version": 2,
                "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=100, mean=None), "metric": 71.2,
                "state_dict_ema": ema}, path)
    with caplog.at_level(logging.INFO, logger="finetune.weights"):
        backbone = create_backbone("resnet18", weights=str(path))
    assert "EMA of its weights (state_dict_ema)" in caplog.text
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], msg=name)


def test_torchvision_reference_checkpoint_loads_model_ema(tmp_path):
    import argparse

    model = torchvision.models.resnet18(weights=None)
    ema = _noisy(model.state_dict(), 2)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": _noisy(model.state_dict(), 3), "epoch": 5, "args": argparse.Namespace(model="resnet18", lr=0.5),
                "model_ema": {"n_averaged": torch.tensor(40), **{f"module.{k}": v for k, v in ema.items()}}}, path)
    backbone = create_backbone("resnet18", weights=str(path))
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], msg=name)


def test_a_namespace_holding_anything_else_is_still_refused(tmp_path):
    import argparse

    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(hook=NotPlain())}, path)
    with pytest.raises(ValueError, match="model.weights"):
        create_backbone("resnet18", weights=str(path))
