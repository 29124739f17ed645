"""One GPU check of the three tasks: host syncs, speed against a raw PyTorch loop, predict and export.

    python benchmarks/gpu_check.py                  # one CUDA GPU (H100/H200): sized for <= 8 min, not yet timed
    python benchmarks/gpu_check.py --json out.json  # also write the figures as JSON (for benchmarks/README.md)
    python benchmarks/gpu_check.py --dry-run        # the same code on the CPU, tiny sizes: checks the script

For classification (ResNet-50), segmentation (DeepLabV3 on a dilated ResNet-50, output stride 8)
and embeddings (ResNet-50 + ArcFace), on JPEG files it generates first, from configs/classify.yaml,
segment.yaml and faces.yaml:
  1. host syncs: `finetune fit` (bf16-mixed, channels_last), and again with --compile true, with
     finetune.host_syncs.HostSyncRecorder appended to the trainer's callbacks: the host syncs in
     steady-state training steps that write no logs (target 0), and where they are. Fatal.
  2. speed: images/s of that `finetune fit` against a raw PyTorch loop (the task's network,
     forward, backward, AdamW, bf16 autocast, channels_last, the same batch size, random data
     already on the device), timed in this run over steady-state steps only. Classification is
     also fed batches already on the device. Targets: fit/raw >= 0.95 for classification with
     data on the device, >= 0.90 for every task from the JPEG files. A miss prints MISSED: it is
     reported, NOT fatal (speed depends on the machine, its CPUs included).
  3. `finetune predict` from the checkpoint of 1, and `finetune export` to ONNX and TorchScript
     with its parity check against PyTorch. Fatal.
Exit status: 0 passed, 1 a fatal check failed (a host sync, a prediction or parity check, a
crash), 2 no CUDA device (without --dry-run).

--dry-run runs the same code on the CPU with timm's resnet18 layout at toy width (the network of
tests/test_speed.py), 32-64 px images, 12 steps and --compile_backend eager: ratios are printed
but not judged (CPU figures say nothing about a GPU); host syncs (on a CPU: tensor reads, see
finetune.host_syncs), predictions and parity are judged.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import unittest.mock
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

for _name, _value in {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}.items():
    os.environ.setdefault(_name, _value)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

import finetune.models.classifier  # noqa: E402
import finetune.models.deeplab  # noqa: E402
import finetune.models.embedding  # noqa: E402
from finetune.backbones import create_backbone  # noqa: E402
from finetune.callbacks.nonfinite import NonFiniteGuard  # noqa: E402
from finetune.cli import create_cli  # noqa: E402
from finetune.data.classification import ImageFolderDataModule  # noqa: E402
from finetune.export.command import export as export_file  # noqa: E402
from finetune.export.command import parse_args as export_args  # noqa: E402
from finetune.host_syncs import HostSyncRecorder  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)  # 91 k parameters
NETWORK_MODULES = (finetune.models.classifier, finetune.models.deeplab, finetune.models.embedding)


@dataclass
class Task:
    name: str  # classification | segmentation | embedding
    config: str  # the GPU config the runs start from
    batch: int
    steps: int  # a multiple of the logging interval
    compiled_steps: int
    size: int  # the model's input: image_size, or segmentation's crop_size
    args: list[str] = field(default_factory=list)  # overrides of the config


def tasks(dry: bool) -> list[Task]:
    if dry:  # segmentation: a multiple of pad_multiple (32), so that fit and raw loop see one size
        small = ["--model.backbone", "resnet18"]  # at toy width: toy_backbones()
        return [
            Task("classification", "classify.yaml", 8, 12, 12, 32, [*small, "--data.image_size", "32"]),
            Task("segmentation", "segment.yaml", 4, 12, 12, 64,
                 [*small, "--model.output_stride", "8", "--model.aspp_channels", "16", "--data.crop_size", "64"]),
            Task("embedding", "faces.yaml", 16, 12, 12, 32,
                 [*small, "--model.embedding_dim", "64", "--data.image_size", "32"]),
        ]
    return [
        Task("classification", "classify.yaml", 64, 300, 100, 224, ["--data.image_size", "224"]),
        Task("segmentation", "segment.yaml", 8, 200, 100, 512,
             ["--model.backbone", "resnet50", "--model.output_stride", "8", "--data.crop_size", "512"]),
        Task("embedding", "faces.yaml", 128, 200, 100, 112, ["--data.image_size", "112"]),
    ]


@dataclass
class Setup:
    dry: bool
    workers: int
    root: Path
    report: Report
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, of the current task

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry else "cuda")

    @property
    def log_every(self) -> int:
        return 4 if self.dry else 50


# --- generated data: random-ish but learnable JPEG files ---------------------------------------

def _write(path: Path, rgb_or_mask: np.ndarray) -> Path:
    """A JPEG (quality 90) of an RGB image, or a PNG of a class-index mask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(rgb_or_mask, 0, 255).astype(np.uint8)
    jpeg = pixels.ndim == 3
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if jpeg else pixels
    if not cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90] if jpeg else []):  # it fails silently
        raise OSError(f"could not write {path}")
    return path


def _copies(paths: list[Path], count: int) -> None:
    """Hard links up to `count` files: the same bytes to read and decode as distinct files, and
    seconds instead of minutes to write tens of thousands of them."""
    for i in range(len(paths), count):
        target = paths[i % len(paths)]
        os.link(target, target.with_name(f"{i:05d}{target.suffix}"))


def write_classification(root: Path, classes: int, per_class: int, unique: int, size: int, seed: int) -> None:
    """A class is a colour (and a square of it), under noise and brightness changes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        colour = cv2.cvtColor(np.uint8([[[180 * c // classes, 200, 200]]]), cv2.COLOR_HSV2RGB)[0, 0].astype(float)
        paths = []
        for i in range(min(unique, per_class)):
            image = rng.normal(64, 20, (size, size, 3)) + colour * rng.uniform(0.3, 0.7)
            top, left = rng.integers(0, size - size // 3, 2)
            image[top:top + size // 3, left:left + size // 3] = colour
            paths.append(_write(root / f"class{c}" / f"{i:05d}.jpg", image))
        _copies(paths, per_class)


def write_segmentation(root: Path, count: int, unique: int, width: int, height: int, seed: int) -> None:
    """Red and blue squares (classes 1, 2) on grey noise (0): JPEG images, PNG masks."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(min(unique, count)):
        image = rng.normal(128, 30, (height, width, 3))
        mask = np.zeros((height, width), np.uint8)
        for label, colour in ((1, (210, 40, 40)), (2, (40, 40, 210))):
            side = int(rng.integers(height // 5, height // 2))
            top, left = rng.integers(0, height - side), rng.integers(0, width - side)
            image[top:top + side, left:left + side] = np.array(colour) + rng.normal(0, 20, (side, side, 3))
            mask[top:top + side, left:left + side] = label
        images.append(_write(root / "images" / f"{i:05d}.jpg", image))
        masks.append(_write(root / "masks" / f"{i:05d}.png", mask))
    _copies(images, count)
    _copies(masks, count)


def write_identities(root: Path, identities: int, per_identity: int, unique: int, size: int, seed: int) -> None:
    """An identity is a 3x3 colour layout, seen shifted, dimmed and noisy (112 px, as aligned faces)."""
    rng = np.random.default_rng(seed)
    for n in range(identities):
        grid = rng.integers(0, 256, (3, 3, 3)).astype(float)
        layout = cv2.resize(grid, (size, size), interpolation=cv2.INTER_NEAREST)
        paths = []
        for i in range(min(unique, per_identity)):
            image = np.roll(layout, rng.integers(-size // 16, size // 16 + 1, 2), axis=(0, 1)) * rng.uniform(0.6, 1.3)
            paths.append(_write(root / f"id{n:05d}" / f"{i:05d}.jpg", image + rng.normal(0, 30, image.shape)))
        _copies(paths, per_identity)


def write_data(root: Path, task: Task, dry: bool) -> Path:
    """root/{train,val}/... as the task's DataModule reads it; one epoch is `steps` batches."""
    folder, images = root / task.name, task.steps * task.batch
    unique = 10**6 if dry else 16  # distinct files per class or identity (segmentation: x4 in all)
    if task.name == "classification":  # a little larger than the input: the crops resize
        write_classification(folder / "train", 10, math.ceil(images / 10), unique, task.size * 9 // 8, 0)
        write_classification(folder / "val", 10, 4, unique, task.size * 9 // 8, 1)
    elif task.name == "segmentation":  # landscape photos around the crops: 640x512 for 512 px
        write_segmentation(folder / "train", images, unique * 4, task.size * 5 // 4, task.size, 0)
        write_segmentation(folder / "val", 16, unique * 4, task.size * 5 // 4, task.size, 1)
        (folder / "classes.yaml").write_text("- background\n- red\n- blue\n")
    else:
        identities = 8 if dry else 500
        write_identities(folder / "train", identities, math.ceil(images / identities), unique, task.size, 0)
        write_identities(folder / "val", 8 if dry else 20, 4, unique, task.size, 1)
    return folder


# --- what the CLI instantiates by class path ----------------------------------------------------

class StepClock(Callback):
    """Images/s from the end of training step `start` to the end of step `stop` (0-based). Both
    are logging steps, so its two synchronisations fall in windows HostSyncRecorder leaves out."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.images = 0
        self._marks: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.start < batch_idx <= self.stop:
            self.images += len(batch["image"])
        if batch_idx in (self.start, self.stop):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self._marks.append(time.perf_counter())

    @property
    def images_per_s(self) -> float:
        return self.images / (self._marks[1] - self._marks[0])


class OnDeviceImages(ImageFolderDataModule):
    """ImageFolderDataModule whose training batches are already on the device.

    The closest honest equivalent of "data already on the GPU" for `finetune fit`: the first
    CACHED batches of the DataModule's own pipeline (decoded JPEGs, uint8) are moved to the
    device once and cycled for as many steps as the JPEG run takes. Lightning's transfer is then
    a no-op, and all that `finetune fit` does on the device still runs: on_after_batch_transfer
    (channels_last, normalisation), the task, the callbacks, the progress bar. Random tensors
    would leave the DataModule out; the raw loop, which has none, gets them.
    """

    CACHED = 8

    def train_dataloader(self):
        loader = super().train_dataloader()
        device = self.trainer.strategy.root_device
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in islice(loader, self.CACHED)]
        return CycledBatches(batches, len(loader))


class CycledBatches:
    """`length` batches from a few, as one loader (Lightning reads a bare list as several)."""

    def __init__(self, batches: list[dict], length: int):
        self.batches, self.length = batches, length

    def __iter__(self):
        # Shallow copies: on_after_batch_transfer replaces the image in the dict it gets.
        return (dict(self.batches[i % len(self.batches)]) for i in range(self.length))

    def __len__(self) -> int:
        return self.length


# --- finetune fit / predict / export, and the raw loop -----------------------------------------

def run_cli(args: list[str]):
    """`finetune ARGS` in-process; what it prints (progress bar, "final validation:") is dropped."""
    # LightningCLI warns when it gets args while sys.argv holds others (this script's own).
    with contextlib.redirect_stdout(io.StringIO()), unittest.mock.patch.object(sys, "argv", sys.argv[:1]):
        return create_cli(args)


def common_args(task: Task, data: Path, run_dir: Path, setup: Setup, data_class: str | None = None) -> list[str]:
    return [
        "--config", str(CONFIGS / task.config), *(["--data.class_path", data_class] if data_class else []),
        "--data.root", str(data), "--data.batch_size", str(task.batch), "--data.num_workers", str(setup.workers),
        "--model.pretrained", "false",  # offline-safe; speed and syncs do not depend on the weights
        *task.args,
        "--trainer.accelerator", setup.device.type, "--trainer.devices", "1",
        # bf16 autocast on the CPU too: the same code (the embedding head's fp32 margin logits included)
        "--trainer.precision", "bf16-mixed", "--trainer.logger", "false",  # no W&B: no network, no service
        "--trainer.default_root_dir", str(run_dir),
    ]


def fit(task: Task, data: Path, run_dir: Path, setup: Setup, compile: bool = False, on_device: bool = False) -> dict:
    """`finetune fit` in-process, with a StepClock and a HostSyncRecorder; returns their figures."""
    steps, log_every = task.compiled_steps if compile else task.steps, setup.log_every
    callbacks = [  # the CLI adds its progress bar, which a user's run updates every step
        # timed from the end of the first logging step: past cuDNN's, the allocator's and compile's warmup
        {"class_path": f"{__name__}.StepClock", "init_args": {"start": log_every - 1, "stop": steps - 1}},
        {"class_path": "finetune.host_syncs.HostSyncRecorder", "init_args": {
            "warmup_steps": 10 if compile and not setup.dry else 1}},  # inductor may compile again in step 2
    ]
    speed = ["--compile", "true"] + (["--compile_backend", "eager"] if setup.dry else []) if compile else []
    args = [
        "fit", *common_args(task, data, run_dir, setup, f"{__name__}.OnDeviceImages" if on_device else None),
        "--model.optimizer", "adamw",  # the raw loop's (segment.yaml and faces.yaml train with SGD)
        "--model.finetuning", '{"strategy": "none"}',  # classify.yaml freezes the backbone in epoch 0
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
        "--trainer.limit_val_batches", "0",  # steady-state training only (and no recompiling for eval)
        # The NaN guard reads its device-side flag every N steps by design: on logging steps here.
        "--trainer.log_every_n_steps", str(log_every), "--nonfinite.check_every_n_steps", str(log_every),
        "--trainer.callbacks", json.dumps(callbacks), "--channels_last", "true", *speed,
    ]
    graphs = _dynamo_graphs()
    cli = run_cli(args)
    graphs = _dynamo_graphs() - graphs if compile else None
    if isinstance(cli.datamodule, OnDeviceImages) != on_device:  # a config's class_path would win if given after
        raise RuntimeError(f"the run used {type(cli.datamodule).__name__}, not the DataModule asked for")
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, HostSyncRecorder))
    clock = next(c for c in cli.trainer.callbacks if isinstance(c, StepClock))
    result = {
        "syncs": recorder.syncs, "steps_watched": recorder.steps, "graphs": graphs, "images_per_s": clock.images_per_s,
        "timed_steps": clock.stop - clock.start, "checkpoint": cli.trainer.checkpoint_callback.last_model_path,
        "model_class": type(cli.model), "hparams": {k: v for k, v in cli.model.hparams.items() if k[0] != "_"},
    }
    del cli
    free_memory()
    return result


def _dynamo_graphs() -> int:
    """Graphs torch.compile has made in this process (0 before its first use)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] if "torch._dynamo" in sys.modules else 0


def free_memory() -> None:
    if "torch._dynamo" in sys.modules:  # compiled graphs hold on to the model they were traced from
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raw_loss(kind: str, model, batch: dict) -> torch.Tensor:
    """The task's training loss, written out as a user would in a plain loop."""
    hp = model.hparams
    if kind == "classification":
        return F.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=hp.label_smoothing)
    if kind == "segmentation":
        logits, aux = model.net.forward_with_aux(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=hp.ignore_index)
        if aux is not None:
            loss = loss + hp.aux_loss_weight * F.cross_entropy(aux, batch["mask"], ignore_index=hp.ignore_index)
        return loss
    return F.cross_entropy(model.head(model.net.embed_unnormalised(batch["image"]), batch["label"]), batch["label"])


def raw_images_per_s(task: Task, fitted: dict, setup: Setup) -> float:
    """A plain loop: the same network (the task's class and arguments), forward, backward, AdamW
    (one group, as torch picks its implementation), bf16 autocast, channels_last, the same batch
    size, one random batch already on the device. The same steps as fit's timed ones, after as
    many warmup steps; synchronised before and after the timed steps only."""
    device, warmup = setup.device, setup.log_every
    torch.manual_seed(0)
    model = fitted["model_class"](**fitted["hparams"]).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    classes, n, size = model.hparams.num_classes, task.batch, task.size
    batch = {"image": torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
             "label": torch.randint(0, classes, (n,), device=device),
             "mask": torch.randint(0, classes, (n, size, size), device=device)}
    for step in range(task.steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = raw_loss(task.name, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model, optimizer, batch, loss
    free_memory()
    return (task.steps - warmup) * task.batch / seconds


def predict(task: Task, data: Path, run_dir: Path, ckpt: str, setup: Setup) -> tuple[bool, str]:
    """`finetune predict` from the checkpoint (with the config's callbacks): an output for every
    image, finite (embeddings: of unit length)."""
    images = data / "val" / ("images" if task.name == "segmentation" else "")
    count, out = sum(1 for _ in images.rglob("*.jpg")), run_dir / "predictions"
    run_cli(["predict", *common_args(task, data, run_dir, setup), "--ckpt_path", ckpt,
             "--data.predict_root", str(images), "--predictions.output_dir", str(out)])
    if task.name == "classification":
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        ok = len(rows) == count and all(math.isfinite(float(r["probability"])) for r in rows)
        return ok, f"{len(rows)} rows in predictions.csv for {count} images"
    if task.name == "segmentation":
        masks = len(list((out / "masks").glob("*.png")))
        return masks == count, f"{masks} masks for {count} images"
    vectors = np.load(out / "embeddings.npy")
    norms = np.linalg.norm(vectors, axis=1)
    ok = len(vectors) == count and np.isfinite(vectors).all() and np.allclose(norms, 1, atol=1e-2)
    return bool(ok), f"embeddings {vectors.shape} for {count} images, norms {norms.min():.3f}-{norms.max():.3f}"


def export(ckpt: str, run_dir: Path, file_format: str) -> tuple[bool, str]:
    """`finetune export`: writes the file, then checks it against PyTorch on 16 val images."""
    output = run_dir / ("model.onnx" if file_format == "onnx" else "model.torchscript.pt")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            export_file(export_args(["--ckpt_path", ckpt, "--format", file_format, "--output", str(output),
                                     "--parity_images", "16"]))
        ok = True
    except SystemExit:  # the parity check failed; its line says how
        ok = False
    parity = [line for line in printed.getvalue().splitlines() if line.startswith("parity")]
    return ok, parity[0] if parity else printed.getvalue().strip()[-300:]


# --- the check ---------------------------------------------------------------------------------

class Report:
    """Result lines on stdout (kept for the JSON), progress on stderr; whether a fatal check failed."""

    def __init__(self, dry: bool):
        self.dry, self.failed, self.lines = dry, False, []
        device = "cpu (dry run)" if dry else torch.cuda.get_device_name()
        self.figures: dict = {"dry_run": dry, "device": device, "torch": torch.__version__, "tasks": {}}

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def progress(self, text: str) -> None:
        print(f"gpu_check: {text} ...", file=sys.stderr, flush=True)

    def check(self, text: str, ok: bool) -> None:
        self.failed |= not ok
        self.line(f"{text} {'PASS' if ok else 'FAIL'}")

    def ratio(self, name: str, fit_speed: float, raw_speed: float, target: float) -> None:
        value = fit_speed / raw_speed
        verdict = "not judged (dry run: CPU figures)" if self.dry else ("PASS" if value >= target else "MISSED")
        self.line(f"{name}: {value:.2f} (target >= {target:.2f}) {verdict}")

    def syncs(self, task: str, mode: str, fitted: dict) -> None:
        count, steps, graphs = len(fitted["syncs"]), fitted["steps_watched"], fitted["graphs"]
        compiled = "" if graphs is None else f", {graphs} graphs compiled"  # none: nothing was checked compiled
        text = f"{task} host syncs ({mode}): {count} in {steps} steady-state non-logging steps (target 0){compiled}"
        self.check(text, count == 0 and steps > 0 and graphs != 0)
        for where, n in Counter(fitted["syncs"]).most_common(10):
            self.line(f"    {n:4d}x {where}")


@contextlib.contextmanager
def timed(setup: Setup, phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        setup.seconds[phase] = setup.seconds.get(phase, 0.0) + time.perf_counter() - start


def check_training(task: Task, data: Path, setup: Setup) -> dict:
    """Host syncs of each `finetune fit`, and its speed against the raw loop's."""
    name, report, runs = task.name, setup.report, {}
    modes = {"eager": {}, "eager, data on the device": {"on_device": True}, "compiled": {"compile": True}}
    with timed(setup, "fit"):
        for mode, how in modes.items():
            if how.get("on_device") and name != "classification":
                continue
            report.progress(f"{name}: finetune fit ({mode})")
            runs[mode] = fit(task, data, setup.root / name / mode.replace(", ", "_").replace(" ", "_"), setup, **how)
            report.syncs(name, mode, runs[mode])
    with timed(setup, "raw loop"):
        report.progress(f"{name}: raw loop")
        raw = raw_images_per_s(task, runs["eager"], setup)
    speeds = {mode: run["images_per_s"] for mode, run in runs.items()}
    report.line(f"{name} img/s (batch {task.batch}, {runs['eager']['timed_steps']} timed steps): raw loop {raw:.1f}; "
                + "; ".join(f"fit {mode} {speed:.1f}" for mode, speed in speeds.items()) + " (compiled: no target)")
    if name == "classification":
        report.ratio(f"{name} fit/raw (on-device data)", speeds["eager, data on the device"], raw, 0.95)
    report.ratio(f"{name} fit/raw (JPEG files)", speeds["eager"], raw, 0.90)
    return {"images_per_s": {"raw loop": raw, **{f"fit {mode}": speed for mode, speed in speeds.items()}},
            "host_syncs": {mode: {"count": len(run["syncs"]), "steps": run["steps_watched"], "graphs": run["graphs"],
                                  "where": dict(Counter(run["syncs"]))} for mode, run in runs.items()},
            "checkpoint": runs["eager"]["checkpoint"]}


def check_outputs(task: Task, data: Path, ckpt: str, setup: Setup) -> dict:
    """`finetune predict` and `finetune export` (ONNX, TorchScript) from the eager run's checkpoint."""
    name, report, run_dir = task.name, setup.report, setup.root / task.name
    with timed(setup, "predict"):
        report.progress(f"{name}: finetune predict")
        ok, what = predict(task, data, run_dir / "predict", ckpt, setup)
    report.check(f"{name} predict ({setup.device.type}, checkpoint): {what}", ok)
    figures = {"predict": what}
    with timed(setup, "export"):
        for file_format in ("onnx", "torchscript"):
            report.progress(f"{name}: finetune export --format {file_format}")
            ok, figures[f"export {file_format}"] = export(ckpt, run_dir / "export", file_format)
            report.check(f"{name} export {file_format}: {figures[f'export {file_format}']}", ok)
    return figures


def check_task(task: Task, setup: Setup) -> dict:
    setup.seconds = {}
    with timed(setup, "data"):
        setup.report.progress(f"{task.name}: writing JPEG files")
        data = write_data(setup.root / "data", task, setup.dry)
    figures = check_training(task, data, setup)
    figures.update(check_outputs(task, data, figures.pop("checkpoint"), setup))
    figures["seconds"] = {phase: round(value, 1) for phase, value in setup.seconds.items()}
    setup.report.line(f"{task.name}: " + ", ".join(f"{phase} {value:.0f} s" for phase, value in setup.seconds.items()))
    return figures


# --- settings for the whole run ----------------------------------------------------------------

@contextlib.contextmanager
def toy_backbones(enabled: bool):
    """Dry run: the tasks build timm's resnet18 layout at toy width, as tests/test_speed.py does, so
    that a fit takes seconds on a CPU; the rest is the GPU run's code. Undone on exit."""
    originals = [module.create_backbone for module in NETWORK_MODULES]
    if enabled:
        for module in NETWORK_MODULES:
            module.create_backbone = partial(create_backbone, **TOY_RESNET)
    try:
        yield
    finally:
        for module, original in zip(NETWORK_MODULES, originals):
            module.create_backbone = original


@contextlib.contextmanager
def quiet(one_thread: bool):
    """Lightning's per-run notes ("GPU available", "Seed set") and the warnings these runs cause on
    purpose (no validation, so no monitored metric) left out; with `one_thread`, one intra-op
    thread: the toy networks gain nothing from more, and on a shared CPU OpenMP threads waiting
    for each other made steps 10-100x slower at random. Undone on exit."""
    loggers = {name: logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")}
    levels, threads = {name: logger.level for name, logger in loggers.items()}, torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*could not find the monitored key|The dirpath has changed")
        for logger in loggers.values():
            logger.setLevel(logging.WARNING)
        torch.set_num_threads(1 if one_thread else threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            for name, logger in loggers.items():
                logger.setLevel(levels[name])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes: checks the script, not the GPU")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--tasks", default="classification,segmentation,embedding", help="a comma-separated subset")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the CPUs less 2; dry run: 0)")
    parser.add_argument("--workdir", help="keep the data, checkpoints and exports here (default: a temp folder)")
    args = parser.parse_args(argv)
    unknown = set(args.tasks.split(",")) - {task.name for task in tasks(args.dry_run)}
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    # The JPEG runs get every core but the main process's and the pin-memory thread's: the most
    # this machine can feed (the DataModules' own default is at most 8).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 4
    workers = args.workers if args.workers is not None else 0 if args.dry_run else max(1, cpus - 2)
    report = Report(args.dry_run)
    report.line(f"gpu_check on {report.figures['device']}, torch {torch.__version__}, {workers} DataLoader workers")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(toy_backbones(args.dry_run))
        if args.dry_run:  # the NaN guard reads its flag as on a GPU, not every step as on a CPU
            stack.enter_context(unittest.mock.patch.object(NonFiniteGuard, "cpu_checks_every_step", False))
        stack.enter_context(quiet(one_thread=args.dry_run))
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        setup = Setup(args.dry_run, workers, root, report)
        for task in (t for t in tasks(args.dry_run) if t.name in args.tasks.split(",")):
            try:
                report.figures["tasks"][task.name] = check_task(task, setup)
            except (Exception, SystemExit):  # a crash (or a CLI error) fails the check; the other tasks still run
                traceback.print_exc()
                report.check(f"{task.name}: crashed (traceback above)", False)
    report.line(f"gpu_check: {'FAILED' if report.failed else 'passed'} in {time.perf_counter() - started:.0f} s "
                "(ratio misses are reported, not fatal)")
    report.figures.update(lines=report.lines, failed=report.failed)
    if args.json:
        Path(args.json).write_text(json.dumps(report.figures, indent=2, default=str) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
