"""`finetune export --format hub`: a Hugging Face Hub folder in timm's layout, its card, its upload.

Checkpoints: one classifier trained for a step on the colour folder (so the checkpoint holds the
data config and ModelCheckpoint's best score); the others are saved untrained, their weights
jittered so that no output is trivially equal. Equal outputs: atol 1e-5 on logits, or bit-equal
where the same code runs on the same weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.data import ImageFolderDataModule
from finetune.export.checkpoint import load_checkpoint
from finetune.export.hub import HubUnavailable, load_hub_folder, push_hub_folder
from finetune.tasks import ClassificationTask, EmbeddingTask, MultiLabelClassificationTask, SegmentationTask

CLASSES = ["blue", "green", "red"]  # the colour folder's, sorted
PREPROCESSING = {"input_size": [3, 40, 40], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.875,
                 "interpolation": "bilinear", "resize_mode": "crop"}
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def finetune(*args) -> str:
    """`finetune ARGS` in-process; returns what it printed."""
    from finetune.commands import main

    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["finetune", *map(str, args)]), contextlib.redirect_stdout(out):
        main()
    return out.getvalue()


def save_untrained(task, path: Path) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in [*task.parameters(), *task.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)  # BatchNorm variances stay positive
    trainer = L.Trainer(enable_checkpointing=False, **QUIET)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def trained(colour_folder, tmp_path_factory):
    """(checkpoint, DataModule, ModelCheckpoint) of a classifier trained one step, validated on one batch."""
    root = tmp_path_factory.mktemp("hub_trained")
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(colour_folder), backbone="resnet18", image_size=32, batch_size=16, num_workers=0)
    task = ClassificationTask(3, backbone="resnet18", pretrained=False, class_names=dm.class_names, lr=3e-3)
    best = ModelCheckpoint(monitor="val/acc", mode="max", dirpath=root / "checkpoints")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[best], default_root_dir=root,
                        **QUIET)
    trainer.fit(task, dm)
    trainer.save_checkpoint(root / "classification.ckpt")
    return root / "classification.ckpt", dm, best


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_untrained")
    common = dict(backbone="resnet18", pretrained=False, preprocessing=PREPROCESSING)
    return {
        "hidden": save_untrained(ClassificationTask(3, class_names=CLASSES, hidden_dim=16, **common), root / "hidden.ckpt"),
        "multilabel": save_untrained(MultiLabelClassificationTask(4, class_names=["cat", "dog", "car", "sky"],
                                                                  threshold=[0.3, 0.4, 0.5, 0.6], **common),
                                     root / "multilabel.ckpt"),
        "segmentation": save_untrained(SegmentationTask(3, backbone="resnet18", pretrained=False,
                                                        class_names=["background", "red", "blue"]), root / "seg.ckpt"),
        "embedding": save_untrained(EmbeddingTask(5, embedding_dim=16, **common), root / "embedding.ckpt"),
    }


@pytest.fixture(scope="module")
def classification_folder(trained) -> tuple[Path, str]:
    """The folder written beside the checkpoint (the default --output), and what export printed."""
    ckpt, _, _ = trained
    printed = finetune("export", "--ckpt_path", ckpt, "--format", "hub", "--parity_images", "6")
    return ckpt.with_name("classification-hub"), printed


@pytest.fixture(scope="module")
def exported(untrained, colour_folder, tmp_path_factory):
    """exported(kind) -> (folder, printed), each written once; parity on the colour folder's val images."""
    root, made = tmp_path_factory.mktemp("hub_folders"), {}

    def get(kind: str) -> tuple[Path, str]:
        if kind not in made:
            folder = root / kind
            printed = finetune("export", "--ckpt_path", untrained[kind], "--format", "hub", "--output", folder,
                               "--images", colour_folder / "val", "--parity_images", "3")
            made[kind] = folder, printed
        return made[kind]

    return get


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def probe(size: int = 32) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_classification_folder_loads_in_timm_with_our_logits(classification_folder, trained):
    folder, printed = classification_folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "parity (timm.create_model('local-dir:') vs PyTorch) on 6 images" in printed and "note:" not in printed
    ckpt, dm, _ = trained
    ours = load_checkpoint(ckpt).network
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(model).__name__ == "ResNet" and model.num_classes == 3
    batch = next(iter(dm.val_dataloader()))["image"][:4]
    images = dm.on_after_batch_transfer({"image": batch}, 0)["image"].float()  # normalised as in validation
    with torch.inference_mode():
        for inputs in (images, probe()):
            expected = ours(inputs)
            assert expected.abs().max() > 1e-3  # not a degenerate zero output
            torch.testing.assert_close(model(inputs), expected, atol=1e-5, rtol=0)
    rebuilt = load_hub_folder(folder)  # ours from the same folder: the very weights
    assert not rebuilt.training
    for name, tensor in ours.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_config_json_is_timms_with_the_checkpoints_preprocessing(classification_folder, trained):
    folder, _ = classification_folder
    ckpt, dm, _ = trained
    config = json.loads((folder / "config.json").read_text())
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["preprocessing"]
    assert stored["input_size"] == [3, 32, 32] and stored["mean"] == pytest.approx(list(dm.mean))
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3 and config["num_features"] == 512
    assert config["label_names"] == CLASSES == dm.class_names
    cfg = config["pretrained_cfg"]
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert cfg[key] == stored[key], key
    assert cfg["num_classes"] == 3 and cfg["crop_mode"] == "center"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    resolved = timm.data.resolve_data_config(model=model)  # what timm's transforms are built from
    assert resolved["input_size"] == (3, 32, 32) and list(resolved["mean"]) == stored["mean"]
    block = config["finetune"]
    assert block["task"] == "classification" and block["activation"] == "softmax"
    assert block["model"]["init_args"]["pretrained"] is False and block["model"]["init_args"]["lr"] == 3e-3


def test_card_names_classes_backbone_data_and_metrics(classification_folder, trained):
    folder, printed = classification_folder
    _, _, best = trained
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"  # resnet18.a1_in1k's, from timm
    assert meta["pipeline_tag"] == "image-classification" and "image-classification" in meta["tags"]
    for name in CLASSES:
        assert f". {name}\n" in card
    assert "timm resnet18" in card and "avg pool -> linear 3" in card
    assert "48 train and 24 val images" in card  # 16 + 8 images of each of the 3 colours
    assert f"val/acc of the best checkpoint (Lightning's ModelCheckpoint): {float(best.best_model_score):.4f}" in card
    parity = next(line for line in printed.splitlines() if line.startswith("parity ("))
    assert f"- {parity}\n" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])  # the training config, as YAML
    assert config["model"]["init_args"]["lr"] == 3e-3 and config["data"]["init_args"]["image_size"] == 32
    assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in card
    assert "## Intended use and limits" in card and "always answers one of its 3 classes" in card


def test_multilabel_folder_says_sigmoid_per_label(exported, untrained):
    folder, _ = exported("multilabel")
    config = json.loads((folder / "config.json").read_text())
    assert config["finetune"]["activation"] == "sigmoid" and config["finetune"]["thresholds"] == [0.3, 0.4, 0.5, 0.6]
    assert config["label_names"] == ["cat", "dog", "car", "sky"]
    card = (folder / "README.md").read_text()
    assert "multi-label-classification" in front_matter(card)["tags"]
    assert "(a sigmoid per label)" in card and "logits.sigmoid()" in card and "[0.3, 0.4, 0.5, 0.6]" in card
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = load_checkpoint(untrained["multilabel"]).network
    with torch.inference_mode():
        expected = ours.predict(probe(40))["probabilities"]
        assert (expected.sum(dim=1) - 1).abs().max() > 0.1  # sigmoids: no softmax in disguise
        torch.testing.assert_close(model(probe(40)).sigmoid(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["segmentation", "embedding"])
def test_dense_and_embedding_folders_reload_with_load_hub_folder(kind, exported, untrained):
    folder, printed = exported(kind)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "timm cannot load it" in notes[0] and "load_hub_folder" in notes[0]
    assert "parity (load_hub_folder vs PyTorch)" in printed
    config = json.loads((folder / "config.json").read_text())
    assert "architecture" not in config and config["finetune"]["task"] == kind
    card = (folder / "README.md").read_text()
    assert front_matter(card)["library_name"] == "finetune" and "network = load_hub_folder(folder)" in card
    ours, rebuilt = load_checkpoint(untrained[kind]).network, load_hub_folder(folder)
    assert type(rebuilt) is type(ours) and not rebuilt.training
    with torch.inference_mode():
        expected, got = ours.predict(probe(48)), rebuilt.predict(probe(48))
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    if kind == "segmentation":
        assert config["label_names"] == ["background", "red", "blue"] and "- 2. blue" in card
    else:
        assert config["num_features"] == 16 and "16-d unit-norm embeddings" in card


def test_hidden_layer_head_prints_the_fallback_line(exported, untrained):
    folder, printed = exported("hidden")
    notes = [line for line in printed.splitlines() if "timm" in line and "parity" not in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "model.hidden_dim 16" in notes[0], printed
    assert "gives resnet18's pooled features (no classifier)" in notes[0] and "load_hub_folder" in notes[0]
    card = (folder / "README.md").read_text()
    assert "model.hidden_dim 16" in card and "`finetune.export.hub.load_hub_folder` does" in card
    ours = load_checkpoint(untrained["hidden"]).network
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # the fine-tuned backbone, no head
    assert plain.num_classes == 0
    with torch.inference_mode():
        torch.testing.assert_close(plain(probe(40)), ours.head.pool(ours.backbone(probe(40))), atol=1e-5, rtol=0)
        torch.testing.assert_close(load_hub_folder(folder)(probe(40)), ours(probe(40)), atol=0, rtol=0)


def never_online(*args, **kwargs):
    raise AssertionError("the test tried the network")


def test_push_offline_exits_with_one_line_and_keeps_the_folder(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.HfApi", never_online)
    monkeypatch.setattr("finetune.hub.host_reachable", never_online)
    folder = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        finetune("export", "--ckpt_path", trained[0], "--format", "hub", "--output", folder, "--parity_images", "2",
                 "--push_to_hub", "me/colours")
    message = str(exited.value.code)
    assert "\n" not in message and message.startswith("finetune export: --push_to_hub: HF_HUB_OFFLINE is set")
    assert f"huggingface-cli upload me/colours {folder}" in message and f"hf upload me/colours {folder}" in message
    assert {p.name for p in folder.iterdir()} == {"README.md", "config.json", "model.safetensors"}
    assert "hf-hub:me/colours" in (folder / "README.md").read_text()  # the card points at the repo


def test_push_when_the_hub_is_unreachable_or_refuses(classification_folder, monkeypatch):
    folder, _ = classification_folder
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi", never_online)
    monkeypatch.setattr("finetune.hub.host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(HubUnavailable, match=r"huggingface\.co is unreachable, so nothing was uploaded"):
        push_hub_folder(folder, "me/colours")
    with pytest.raises(ValueError, match="--push_to_hub: 'colours' is not a Hub repo id"):
        push_hub_folder(folder, "colours")

    calls = []

    class FakeApi:  # huggingface_hub.HfApi's two calls, recorded
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))
            return FakeUrl(repo_id)

        def upload_folder(self, *, repo_id, folder_path, commit_message=None):
            calls.append(("upload_folder", repo_id, folder_path))
            if repo_id == "me/locked":
                raise OSError("401 Client Error: Unauthorized\nmore detail")

    class FakeUrl(str):  # as huggingface_hub.RepoUrl: the URL, with its repo_id
        def __new__(cls, repo_id):
            url = super().__new__(cls, f"https://huggingface.co/{repo_id}")
            url.repo_id = repo_id
            return url

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("finetune.hub.host_reachable", lambda url, timeout=3.0: True)
    assert push_hub_folder(folder, "me/colours") == "https://huggingface.co/me/colours"
    assert calls == [("create_repo", "me/colours", True), ("upload_folder", "me/colours", str(folder))]
    with pytest.raises(HubUnavailable) as refused:
        push_hub_folder(folder, "me/locked")
    assert "\n" not in str(refused.value) and "(401 Client Error: Unauthorized;" in str(refused.value)


def test_wandb_flag_logs_what_was_written(trained, tmp_path, monkeypatch):
    logged = []
    fake = types.ModuleType("finetune.export.wandb_artifact")
    fake.log_exported = lambda path, ckpt_path, metadata: logged.append((path, ckpt_path, metadata))
    monkeypatch.setitem(sys.modules, "finetune.export.wandb_artifact", fake)  # the real one is tested on its own
    folder = tmp_path / "logged"
    finetune("export", "--ckpt_path", trained[0], "--format", "hub", "--output", folder, "--parity_images", "2",
             "--wandb", "true")
    [(path, ckpt_path, metadata)] = logged
    assert path == folder and ckpt_path == str(trained[0])
    assert metadata["format"] == "hub" and metadata["class_names"] == CLASSES and metadata["parity"]["images"] == 2
    with pytest.raises(SystemExit, match="--push_to_hub: only with --format hub"):
        finetune("export", "--ckpt_path", trained[0], "--format", "onnx", "--push_to_hub", "me/colours")
