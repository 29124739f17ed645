"""Parity at export: the written file (onnxruntime / TorchScript), or a rebuilt release, against the
PyTorch network on real images, preprocessed as in training. Fails above a tolerance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from finetune.data.folder import list_images
from finetune.export.graph import ExportGraph
from finetune.export.runtime import ExportedModel, Preprocess, batches

# Float32 on CPU: the exported graphs differ from eager PyTorch by ~1e-6 (fused and reordered
# ops). A diff is measured against max(1, largest |reference value|), so probabilities and unit
# embeddings get 1e-4 absolute and logits the same relative bound.
DEFAULT_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    tolerance: float
    engine: str  # what ran the candidate: onnxruntime, torchscript, rebuilt release
    images: int = 0
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    labels: int = 0  # compared argmax labels: images (classification) or pixels (segmentation)
    label_differences: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # by output: the worst batch's reason

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.max_abs_diff.items())
        line = f"parity ({self.engine} vs PyTorch) on {self.images} images: max abs diff {diffs} (tolerance {self.tolerance:.0e})"
        if self.labels:
            line += f"; same argmax on {self.labels - self.label_differences}/{self.labels}"
        return line + ("" if self.ok else "; FAILED: " + "; ".join(self.failures.values()))

    def add(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> None:
        self.images += len(next(iter(reference.values())))
        for name, ref in reference.items():
            out = candidate[name]
            if out.shape != ref.shape:
                self.failures[name] = f"{name} has shape {out.shape}, PyTorch gives {ref.shape}"
                continue
            if name == "mask":  # integer labels: compared below, with ties allowed for
                continue
            diff = float(np.abs(out.astype(np.float64) - ref).max())
            self.max_abs_diff[name] = max(diff, self.max_abs_diff.get(name, 0.0))
            if diff > self.tolerance * max(1.0, float(np.abs(ref).max())):
                self.failures[name] = f"{name} differs by up to {self.max_abs_diff[name]:.2e}"
        if "probabilities" in reference and "probabilities" in candidate:
            self._compare_labels(reference, candidate)

    def _compare_labels(self, reference, candidate) -> None:
        probs = reference["probabilities"]
        ranked = np.sort(probs, axis=1)
        tie = (ranked[:, -1] - ranked[:, -2]) <= 2 * self.tolerance  # either answer is right
        expected = probs.argmax(axis=1)
        got = candidate["mask"] if "mask" in candidate else candidate["probabilities"].argmax(axis=1)
        if got.shape != expected.shape:
            return
        differ = got != expected
        self.labels += expected.size
        self.label_differences += int(differ.sum())
        if (differ & ~tie).any():
            self.failures["labels"] = f"{self.label_differences} argmax labels differ (not at ties)"


def sample_images(root: str | Path, limit: int) -> list[Path]:
    """Up to `limit` images spread over the held-out split of a data folder (or over `root`)."""
    root = Path(root).expanduser()
    folder = next((f for f in (root / "val" / "images", root / "val", root / "images", root) if f.is_dir()), None)
    if folder is None:
        return []
    images = [p for p in list_images(folder) if "masks" not in p.relative_to(folder).parts]
    return images[:: max(1, len(images) // limit)][:limit] if limit > 0 else images


def normalized_like_training(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W], (x / 255 - mean) / std: albumentations'
    Normalize, which the DataModules' on-device normalisation reproduces."""
    step = A.Normalize(mean=mean, std=std)
    return torch.from_numpy(np.stack([step(image=image)["image"] for image in images])).permute(0, 3, 1, 2).contiguous()


def pytorch_runner(network, output_names, mean, std) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The network in eager PyTorch, fed as in training: uint8 images -> outputs by name."""
    graph = ExportGraph(network, output_names, mean, std, normalize_in_graph=False).eval()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = graph(normalized_like_training(images, mean, std))
        return {name: t.numpy() for name, t in zip(graph.output_names, outputs)}

    return run


def _reference(loaded, network=None):
    prep = loaded.preprocessing
    return pytorch_runner(network if network is not None else loaded.network, loaded.contract.outputs, prep.mean, prep.std)


def check_file(loaded, path: str | Path, images: list[Path], tolerance: float = DEFAULT_TOLERANCE,
               batch_size: int = 8) -> ParityReport:
    """An exported .onnx / TorchScript file against the PyTorch network."""
    model = ExportedModel(path)
    reference = _reference(loaded)
    report = ParityReport(tolerance, model.engine)
    for _, batch in model.batches(images, batch_size):
        report.add(reference(batch), model.run(batch))
    return report


def check_rebuilt(loaded, rebuilt, images: list[Path], tolerance: float = DEFAULT_TOLERANCE) -> ParityReport:
    """A network rebuilt from a release against the original network, on the same inputs."""
    original, copy = _reference(loaded), _reference(loaded, rebuilt)
    report = ParityReport(tolerance, "rebuilt from the release")
    for _, batch in batches(images, Preprocess(loaded.preprocessing.to_dict())):
        report.add(original(batch), copy(batch))
    return report
