"""The degradation problem (He et al. 2016, sec. 4.2) on Fashion-MNIST, on a CPU.

Plain and residual CIFAR-style nets of the same depth 6n + 2 (n = 3: 20 layers, n = 9: 56):
a 3x3 conv stem, three stages of n BasicBlocks at widths 16/32/64 (stride 2 between stages),
global average pooling and a linear classifier. The only difference is the identity
shortcut. Between stages the shortcut is the paper's option A (subsample by 2, zero-pad the
new channels): parameter-free, so plain-n and resnet-n have exactly the same parameters.

    python -m experiments.degradation                 # from the repository root: the full run (CPU, one thread)
    python -m experiments.degradation --epochs 2 --train-size 500 --out /tmp/deg

writes `degradation.csv` (per model and epoch: training loss and error, test error),
`gradients.csv` (‖∂L/∂x_l‖ / ‖∂L/∂x_L‖ per block, at init and after training),
`lesion.csv` (test error with one block deleted), `settings.json` and `degradation.png`.
Data: Debian's Fashion-MNIST (`dataset-fashion-mnist`) when installed, else the 1000-image
sample in data/fashion-mnist-sample (enough for short runs, not for the full one).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import struct
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from finetune.callbacks.gradient_flow import find_blocks, measure_gradient_flow

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-sample"  # experiments/ sits beside data/
WIDTHS = (16, 32, 64)


class Block(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut when `residual`, then ReLU (the paper's
    BasicBlock). Without the shortcut it is two layers of a plain net."""

    def __init__(self, in_channels: int, channels: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self.shortcut(x, out.shape[1])
        return F.relu(out)

    def shortcut(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """Identity; at a stage transition option A: subsample, zero-pad the new channels."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class CifarNet(nn.Module):
    """6n + 2 weighted layers: the stem conv, 3 stages x n blocks x 2 convs, the classifier.
    Blocks sit in `layer1..3` Sequentials, as in timm's ResNet, so GradientFlow finds them."""

    def __init__(self, depth: int, residual: bool, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ..., 56), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.residual = depth, residual
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        previous = WIDTHS[0]
        for index, width in enumerate(WIDTHS):
            stride = 1 if index == 0 else 2
            blocks = [Block(previous if i == 0 else width, width, stride if i == 0 else 1, residual) for i in range(n)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            previous = width
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        for module in self.modules():  # He init, as in the paper
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def name(self) -> str:
        return f"{'resnet' if self.residual else 'plain'}-{self.depth}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class LitNet(L.LightningModule):
    """A CifarNet under a Lightning Trainer with the experiment's optimizer (SGD, momentum 0.9, the
    full run's LR): how GradientFlow (or any callback) watches the experiment nets. Batches are
    (images, labels) tuples."""

    def __init__(self, depth: int, residual: bool, lr: float = 0.02, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = CifarNet(depth, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)


# --- data -----------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped): big-endian dims after a 4-byte magic."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_sample_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths = [(p, label) for label, name in enumerate(classes) for p in sorted((folder / name).glob("*.png"))]
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p, _ in paths])
    return images, np.array([label for _, label in paths])


def load_fashion_mnist(source: str = "auto") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """{"train": (uint8 N x 28 x 28, labels), "test": ...} and where they came from.

    `source`: "debian" (60000 + 10000 images), "sample" (1000 + 200, data/fashion-mnist-sample)
    or "auto" (Debian's when installed).
    """
    debian = DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz"
    if source == "debian" or (source == "auto" and debian.exists()):
        splits = {
            split: (read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"),
                    read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"))
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
        return splits, str(DEBIAN_FASHION_MNIST)
    if source not in ("auto", "sample"):
        raise ValueError(f"source must be auto, debian or sample, got {source!r}")
    return {"train": _read_sample_split(SAMPLE / "train"), "test": _read_sample_split(SAMPLE / "val")}, str(SAMPLE)


def to_tensors(images: np.ndarray, labels: np.ndarray, size: int, count: int | None, seed: int):
    """A seeded class-mixed subset of `count` images, scaled to `size` px and standardised."""
    if count is not None and count < len(images):
        keep = np.random.default_rng(seed).permutation(len(images))[:count]
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # Fashion-MNIST's pixel mean and std: fixed, so train and test are scaled alike.
    return (x - 0.286) / 0.353, torch.from_numpy(labels.astype(np.int64))


# --- training -------------------------------------------------------------------------------


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    wrong = sum(int((model(x[i : i + batch_size]).argmax(1) != y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return wrong / len(x)


def train(model: nn.Module, train_data, test_data, epochs: int, batch_size: int = 128, lr: float = 0.1,
          weight_decay: float = 1e-4, milestones: tuple[int, ...] = (), seed: int = 0, warmup_epochs: int = 0,
          on_epoch=None) -> list[dict]:
    """SGD, momentum 0.9, from scratch: the paper's recipe. LR / 10 after each milestone epoch;
    `warmup_epochs` at LR / 10 first (the paper's start for ResNet-110, where 0.1 is too large
    to begin with). The batch order depends only on `seed` and the epoch, so every net sees
    the same batches.

    Training error is the error on the mini-batches as they were trained on (train mode,
    averaged over the epoch), the quantity of the paper's thin curves.
    """
    x, y = train_data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: 0.1 if done < warmup_epochs else 0.1 ** sum(done >= m for m in milestones)
    )
    rows = []
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        loss_sum, wrong = 0.0, 0
        for i in range(0, len(x), batch_size):
            index = order[i : i + batch_size]
            logits = model(x[index])
            loss = F.cross_entropy(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(index)
            wrong += int((logits.argmax(1) != y[index]).sum())
        schedule.step()
        row = {"epoch": epoch, "train_loss": loss_sum / len(x), "train_error": wrong / len(x),
               "test_error": error_rate(model, *test_data), "seconds": time.perf_counter() - start}
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return rows


def gradient_ratios(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """‖∂L/∂x_l‖ / ‖∂L/∂x_L‖ per block on one batch in train mode (BN on batch statistics,
    as during training); the BN running statistics are restored so this changes nothing."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    ratios = measure_gradient_flow(model, x, y)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return ratios


class _Skip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def lesion_errors(model: CifarNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test error with one block deleted at a time (Veit et al. 2016). Only blocks whose input
    and output shapes agree can go: not the first block of stages 2 and 3."""
    errors = {}
    for name, block in find_blocks(model):
        if block.stride != 1 or block.conv1.in_channels != block.conv2.out_channels:
            continue
        stage, index = name.split(".")
        container = getattr(model, stage)
        container[int(index)] = _Skip()
        try:
            errors[name] = error_rate(model, x, y)
        finally:
            container[int(index)] = block
    return errors


# --- the experiment -------------------------------------------------------------------------


def run(depths=(20, 56), epochs: int = 12, train_size: int | None = 20000, test_size: int | None = 2000,
        image_size: int = 16, batch_size: int = 128, lr: float = 0.02, weight_decay: float = 1e-4,
        milestones: tuple[int, ...] = (6, 9), seed: int = 0, source: str = "auto", lesion: bool = True,
        warmup_epochs: int = 0, log=print) -> dict:
    """Train plain and residual nets of each depth; everything the figures need, as rows."""
    splits, data_source = load_fashion_mnist(source)
    train_data = to_tensors(*splits["train"], image_size, train_size, seed)
    test_data = to_tensors(*splits["test"], image_size, test_size, seed)
    probe_batch = (train_data[0][:batch_size], train_data[1][:batch_size])
    results = {"curves": [], "gradients": [], "lesion": []}
    for depth in depths:
        for residual in (False, True):
            torch.manual_seed(seed)  # the same init draw for every net (train() seeds the batch order)
            model = CifarNet(depth, residual)
            ratios = gradient_ratios(model, *probe_batch)
            results["gradients"] += [{"model": model.name, "when": "init", "block": b, "ratio": r} for b, r in ratios.items()]

            def report(row, name=model.name):
                log(f"{name:10s} epoch {row['epoch']:3d}  train error {row['train_error']:.4f}  "
                    f"test error {row['test_error']:.4f}  loss {row['train_loss']:.4f}  ({row['seconds']:.0f} s)")

            rows = train(model, train_data, test_data, epochs, batch_size, lr, weight_decay, milestones, seed,
                         warmup_epochs, report)
            results["curves"] += [{"model": model.name, "depth": depth, "residual": residual, **row} for row in rows]
            ratios = gradient_ratios(model, *probe_batch)
            results["gradients"] += [{"model": model.name, "when": "trained", "block": b, "ratio": r} for b, r in ratios.items()]
            if lesion:
                baseline = error_rate(model, *test_data)
                results["lesion"] += [{"model": model.name, "block": "none", "test_error": baseline}]
                results["lesion"] += [{"model": model.name, "block": b, "test_error": e}
                                      for b, e in lesion_errors(model, *test_data).items()]
    results["settings"] = {
        "depths": list(depths), "epochs": epochs, "train_size": len(train_data[1]), "test_size": len(test_data[1]),
        "image_size": image_size, "batch_size": batch_size, "lr": lr, "momentum": 0.9, "weight_decay": weight_decay,
        "milestones": list(milestones), "warmup_epochs": warmup_epochs, "seed": seed, "data": data_source, "shortcut": "option A (parameter-free)",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": _machine(),
    }
    return results


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    return f"{cpu}, {platform.system()}, {os.cpu_count()} cores"


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def read_csv(path: Path) -> list[dict]:
    """Rows back from `_write_csv`, numbers as numbers."""
    def value(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(text, text)

    with Path(path).open() as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(curves: list[dict], title: str = ""):
    """The paper's Fig. 6 layout: plain nets left, residual nets right; training error solid,
    test error dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = {}
    for ax, residual in zip(axes, (False, True)):
        for name in dict.fromkeys(r["model"] for r in curves if r["residual"] == residual):
            rows = [r for r in curves if r["model"] == name]
            colour = colours.setdefault(rows[0]["depth"], f"C{len(colours)}")
            epochs = [r["epoch"] for r in rows]
            ax.plot(epochs, [100 * r["train_error"] for r in rows], color=colour, label=f"{name} train")
            ax.plot(epochs, [100 * r["test_error"] for r in rows], color=colour, ls="--", label=f"{name} test")
        ax.set_title("residual" if residual else "plain")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(results: dict, out: Path, wall_seconds: float, cpu_seconds: float | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "degradation.csv", results["curves"])
    _write_csv(out / "gradients.csv", results["gradients"])
    _write_csv(out / "lesion.csv", results["lesion"])
    settings = {**results["settings"], "wall_seconds": round(wall_seconds)}
    if cpu_seconds is not None:  # on a shared machine the wall time says little
        settings["cpu_seconds"] = round(cpu_seconds)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    s = settings
    schedule = f"SGD lr {s['lr']}" + (f", /10 after epochs {', '.join(map(str, s['milestones']))}" if s["milestones"] else "")
    schedule += f", {s['warmup_epochs']} warmup epoch(s) at lr/10" if s["warmup_epochs"] else ""
    title = f"Fashion-MNIST, {s['train_size']} training images at {s['image_size']} px; {schedule}; {s['epochs']} epochs"
    try:
        fig = plot_curves(results["curves"], title)
    except ImportError:  # matplotlib comes with the dev extra; the CSVs are written already
        print("matplotlib is not installed (pip install -e '.[dev]'): no degradation.png")
        return
    fig.savefig(out / "degradation.png", dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02, help="the paper's 0.1 is unstable for resnet-56 here (see notebook 04)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--milestones", type=int, nargs="*", default=[6, 9], help="epochs after which the LR drops 10x")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="epochs at LR / 10 first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["auto", "debian", "sample"], default="auto")
    parser.add_argument("--no-lesion", action="store_true", help="skip the delete-one-block study")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: share the machine)")
    parser.add_argument("--out", type=Path, default=Path("runs/degradation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = run(tuple(args.depths), args.epochs, args.train_size, args.test_size, args.image_size, args.batch_size,
                  args.lr, args.weight_decay, tuple(args.milestones), args.seed, args.data, not args.no_lesion,
                  args.warmup_epochs)
    wall = time.perf_counter() - start
    save(results, args.out, wall, time.process_time() - cpu_start)
    last = max(r["epoch"] for r in results["curves"])
    print(f"\nat epoch {last} ({wall / 60:.1f} min):")
    for row in (r for r in results["curves"] if r["epoch"] == last):
        print(f"  {row['model']:10s} train error {row['train_error']:.4f}  test error {row['test_error']:.4f}")
    print(f"written to {args.out}/")
    return results


if __name__ == "__main__":
    main()
