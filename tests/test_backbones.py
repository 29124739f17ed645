"""Contract over every supported backbone, names, and the pretrained hub path offline."""

from __future__ import annotations

import time

import pytest
import timm
import torch

from finetune.backbones import SUPPORTED_BACKBONES, check_backbone_name, create_backbone, data_config
from finetune.hub import PretrainedWeightsUnavailable


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_backbone_contract(name):
    backbone = create_backbone(name).eval()
    channels = timm.create_model(name, features_only=True).feature_info.channels()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    # Last feature map at stride 32, as wide as timm's feature_info says the last stage is.
    assert features.shape == (2, channels[-1], 2, 2)
    assert backbone.num_features == channels[-1]
    assert torch.isfinite(features).all()


def test_weight_tags_are_accepted_and_set_preprocessing():
    assert check_backbone_name("resnet50.tv2_in1k") == "resnet50.tv2_in1k"
    assert data_config("resnet50.tv2_in1k")["interpolation"] == "bilinear"
    assert data_config("resnet18")["interpolation"] == "bicubic"


@pytest.mark.parametrize(
    "typo, suggestion", [("resnet51", "resnet50"), ("resnext50_32x4", "resnext50_32x4d"), ("resnet50.tv9_in1k", "resnet50.tv2_in1k")]
)
def test_unknown_backbone_names_close_matches(typo, suggestion):
    with pytest.raises(ValueError, match="close matches") as err:
        check_backbone_name(typo)
    assert suggestion in str(err.value)
    assert "\n" not in str(err.value)


def test_pretrained_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match="--model.weights") as err:
        create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


def test_pretrained_auto_falls_back_to_random_init(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    backbone = create_backbone("resnet18", pretrained="auto")
    assert isinstance(backbone, torch.nn.Module)
    assert "random init" in caplog.text


def test_pretrained_offline_uses_the_hf_cache(monkeypatch, tmp_path):
    """Weights already in the HF cache load with no network, through timm's own path."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", num_classes=1000)
    snapshot = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_backbone("resnet18", pretrained=True)
    torch.testing.assert_close(loaded.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(loaded.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
