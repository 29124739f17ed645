"""The networks are plain nn.Modules that a checkpoint's hyperparameters rebuild without
Lightning, and checkpoints from before they moved into `task.net` still load."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch

from finetune.contract import build_network
from finetune.export.checkpoint import load_checkpoint
from finetune.tasks import ClassificationTask, EmbeddingTask, SegmentationTask

TASKS = {
    "classification": (ClassificationTask, {"num_classes": 3}),
    "segmentation": (SegmentationTask, {"num_classes": 3, "output_stride": 16}),
    "embedding": (EmbeddingTask, {"num_classes": 4, "embedding_dim": 16}),
}


def save(task, path, legacy: bool = False):
    """A checkpoint as `finetune fit` writes one; `legacy`: with the keys of before `task.net`."""
    hparams = {**task.hparams, "_class_path": f"{type(task).__module__}.{type(task).__qualname__}"}
    state = task.state_dict()
    if legacy:
        state = {key.removeprefix("net."): tensor for key, tensor in state.items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    return path


@pytest.mark.parametrize("kind", TASKS)
def test_the_task_trains_its_contracts_network_and_export_rebuilds_it(kind, tmp_path):
    cls, args = TASKS[kind]
    torch.manual_seed(0)
    task = cls(backbone="resnet18", pretrained=False, **args).eval()
    assert isinstance(task.net, cls.contract.network) and task.backbone is task.net.backbone
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = task.net.predict(images)
        assert list(outputs) == list(cls.contract.outputs)  # the exported graph's names, in order
        for legacy in (False, True):
            loaded = load_checkpoint(save(task, tmp_path / f"{kind}{legacy}.ckpt", legacy))
            again = loaded.network.predict(images)
            for name, value in outputs.items():
                torch.testing.assert_close(again[name], value, msg=name)
            reloaded = cls.load_from_checkpoint(tmp_path / f"{kind}{legacy}.ckpt", map_location="cpu")
            for name, tensor in task.state_dict().items():
                assert torch.equal(reloaded.state_dict()[name], tensor), name


NO_LIGHTNING = """
import sys, torch
from finetune.contract import build_network
from finetune.models import Classifier
saved = torch.load(sys.argv[1], weights_only=True)
network = build_network(Classifier, saved["hyper_parameters"])
network.load_state_dict({k.removeprefix("net."): v for k, v in saved["state_dict"].items()})
probs = network.eval().predict(torch.zeros(1, 3, 32, 32))["probabilities"]
assert probs.shape == (1, 3), probs.shape
assert not any(m.split(".")[0] == "lightning" for m in sys.modules), "lightning was imported"
print("ok")
"""


def test_a_network_is_rebuilt_from_a_checkpoint_without_lightning(tmp_path):
    task = ClassificationTask(3, backbone="resnet18", pretrained=False)
    path = save(task, tmp_path / "task.ckpt")
    assert build_network(type(task).contract.network, dict(task.hparams)).state_dict().keys() == task.net.state_dict().keys()
    result = subprocess.run([sys.executable, "-c", NO_LIGHTNING, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
