"""Running `finetune fit` as users launch it on several processes: Lightning's own launcher
(`--trainer.strategy ddp --trainer.devices 2`) and torchrun, on CPU (gloo), in new process
sessions that a test can signal as a whole."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import nn

from finetune.callbacks.nonfinite import NonFiniteGuard
from finetune.host_syncs import HostSyncRecorder
from finetune.tasks import ClassificationTask

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FINETUNE = str(Path(sys.executable).parent / "finetune")


class FixedBatchNormTask(ClassificationTask):
    """BatchNorm statistics fixed: per-rank batch statistics (no SyncBN on CPU) would
    otherwise make 2x8 differ from 1x16 by design, hiding what the DDP tests check."""

    def on_train_start(self):  # a run resumed mid-epoch gets no on_train_epoch_start (Lightning 2.6)
        super().on_train_start()
        self._fix_batchnorm()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._fix_batchnorm()

    def _fix_batchnorm(self):
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def fit_args(data: Path, run: Path, batch_size: int, *extra: str) -> list[str]:
    """Quickstart on the colour images at 32 px: SGD (Adam would amplify the rounding
    differences of a sum over 2 ranks), fixed BatchNorm, no W&B, no workers; the backbone
    unfreezes at epoch 1, after DDP wrapped the model (its gradients are averaged by the task)."""
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.class_path", "launch.FixedBatchNormTask",
        "--model.finetuning", '{"strategy": "freeze_then_unfreeze", "unfreeze_at": [1]}',
        "--model.optimizer", "sgd", "--model.lr", "0.02", "--model.pretrained", "false",
        "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", str(batch_size),
        "--data.num_workers", "0", "--trainer.max_epochs", "4", "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run), *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    """This interpreter's environment, with the tests importable (`launch.FixedBatchNormTask`)
    and one thread a process: two processes share the two cores."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A new session: its process group is the run's alone, so a test can signal all of it."""
    return subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=kwargs.pop("env", environment()),
        start_new_session=True, **kwargs,
    )


def ddp_fit(data: Path, run: Path, *extra: str) -> list[str]:
    """`finetune fit` on 2 processes started by Lightning, batch 8 each (global 16)."""
    return [FINETUNE, "fit", *fit_args(data, run, 8, "--trainer.strategy", "ddp", "--trainer.devices", "2", *extra)]


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(weights: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


class SignalGroupAt(Callback):
    """After training step `step`, rank 0 sends `signum` to its whole process group, as SLURM,
    systemd or a terminal's Ctrl+C do: every rank gets it, each at some point of its own step."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.is_global_zero and trainer.global_step == self.step:
            os.killpg(os.getpgid(0), self.signum)

    @staticmethod
    def arg(step: int, signum: int = int(signal.SIGTERM)) -> str:
        return "--trainer.callbacks+=" + json.dumps({"class_path": "launch.SignalGroupAt", "init_args": {"step": step, "signum": signum}})


class SyncsToFile(HostSyncRecorder):
    """HostSyncRecorder that writes what each rank found to `folder/syncs-rank<r>.json`. The
    NaN guard reads its flag on logging steps only, as on a GPU (on CPU it reads every step)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def setup(self, trainer, pl_module, stage: str) -> None:
        NonFiniteGuard.cpu_checks_every_step = False

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        record = {"steps": self.steps, "syncs": self.syncs}
        (self.folder / f"syncs-rank{trainer.global_rank}.json").write_text(json.dumps(record))

    @staticmethod
    def arg(folder: Path) -> str:
        return "--trainer.callbacks+=" + json.dumps({"class_path": "launch.SyncsToFile", "init_args": {"folder": str(folder)}})


def torchrun_node(node_rank: int, nodes: int, port: int, *finetune_args: str) -> list[str]:
    """One node of a torchrun job on this machine: 1 process a node, rendezvous on 127.0.0.1."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
        "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
        FINETUNE, "fit", *finetune_args,
    ]
