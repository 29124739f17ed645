"""Run an exported file on image files, preprocessed as in training: ONNX through onnxruntime
(no torch needed), TorchScript through torch.jit. No Lightning: `finetune predict --exported`
and the export's parity check both run files through this."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from finetune.data.images import read_rgb
from finetune.export.metadata import INPUT_NAME, TORCHSCRIPT_FILE, from_props
from finetune.preprocessing import Preprocessing


class Preprocess:
    """Image file -> uint8 HxWx3 RGB as the graph takes it: read and resized as the DataModules'
    evaluation does (the metadata's finetune.preprocessing.Preprocessing: JPEG decode shrink,
    short-side resize and centre crop, or the whole image squashed), without the normalisation.
    Full-resolution tasks (segmentation) keep each image's own size."""

    def __init__(self, meta: dict):
        self.geometry = self.shrink = None
        prep = Preprocessing.from_dict(meta)
        if prep.input_size is None:
            return
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        pipeline = prep.eval_transform(normalize=False)
        self.geometry = A.Compose([t for t in pipeline.transforms if not isinstance(t, (A.Normalize, ToTensorV2))])
        self.shrink = prep.eval_shrink()

    def __call__(self, path: str | Path) -> np.ndarray:
        image = read_rgb(path, self.shrink)
        return image if self.geometry is None else self.geometry(image=image)["image"]


def batches(paths: Iterable[str | Path], preprocess: Preprocess, batch_size: int = 16) -> Iterator[tuple[list[str], np.ndarray]]:
    """Prepared images in batches of consecutive images that share a size (segmentation images
    keep their own sizes, so they batch only with equals)."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in paths:
        image = preprocess(path)
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield names, np.stack(images)
            names, images = [], []
        names.append(str(path))
        images.append(image)
    if images:
        yield names, np.stack(images)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] as A.Normalize does, for graphs exported
    without normalisation inside."""
    mean = np.asarray(mean, dtype=np.float32) * 255.0
    std = np.asarray(std, dtype=np.float32) * 255.0
    return np.ascontiguousarray(((images.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))


class ExportedModel:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--exported: {self.path} does not exist; write it with `finetune export`")
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(self.path), providers=ort.get_available_providers())
            self.metadata = from_props(self.session.get_modelmeta().custom_metadata_map)
            self.engine = "onnxruntime"
        else:
            self.session = None
            self.module, self.metadata = _load_torchscript(self.path)
            self.engine = "torchscript"
        if "task" not in self.metadata:
            raise ValueError(f"--exported: {self.path} carries no finetune metadata; write it with `finetune export`")
        self.task = self.metadata["task"]
        self.output_names = list(self.metadata["outputs"])
        self.preprocess = Preprocess(self.metadata)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """`images`: uint8 [N, H, W, 3] RGB, preprocessed. Returns the graph's outputs by name."""
        meta = self.metadata
        batch = images if meta["input"]["normalized_in_graph"] else normalize(images, meta["mean"], meta["std"])
        if self.session is not None:
            outputs = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(batch)})
        else:
            import torch

            with torch.inference_mode():
                outputs = [t.numpy() for t in self.module(torch.from_numpy(np.ascontiguousarray(batch)))]
        return dict(zip(self.output_names, outputs))

    def batches(self, paths: Iterable[str | Path], batch_size: int = 16) -> Iterator[tuple[list[str], np.ndarray]]:
        return batches(paths, self.preprocess, batch_size)


def _load_torchscript(path: Path):
    import torch

    files = {TORCHSCRIPT_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except RuntimeError:
        raise ValueError(f"--exported: {path} is neither .onnx nor a TorchScript file; write it with `finetune export`") from None
    return module.eval(), (json.loads(files[TORCHSCRIPT_FILE]) if files[TORCHSCRIPT_FILE] else {})
