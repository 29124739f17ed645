"""The files `finetune predict` writes. A task's contract names its writer (`WRITERS`); the
Lightning callback (finetune.callbacks.predictions, from a checkpoint) and `finetune predict
--exported` (no Lightning) both write through it, so the two paths write the same CSV, mask
PNGs and embeddings. Nothing here may import Lightning or torch."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.images import read_rgb


def csv_header(top_k: int) -> list[str]:
    return ["path", "prediction", "probability", f"top{top_k}"]


def csv_rows(paths: list[str], probs: np.ndarray, names: list[str], top_k: int) -> list[list[str]]:
    """One row per image: path, best class, its probability, top-k as `class:prob;...`."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, : min(top_k, probs.shape[1])]
    rows = []
    for path, best, p in zip(paths, order, probs):
        top = ";".join(f"{names[i]}:{p[i]:.4f}" for i in best)
        rows.append([path, names[best[0]], f"{p[best[0]]:.4f}", top])
    return rows


def label_set_rows(paths: list[str], probs: np.ndarray, names: list[str], thresholds) -> list[list[str]]:
    """One row per image: path, the labels at or above their thresholds (`a;b`, in class order;
    empty for none), and every label's probability (`a:0.9731;b:0.0123;...`)."""
    above = probs >= np.asarray(thresholds, dtype=probs.dtype)
    return [
        [path, ";".join(n for n, hit in zip(names, hits) if hit), ";".join(f"{n}:{q:.4f}" for n, q in zip(names, p))]
        for path, p, hits in zip(paths, probs, above)
    ]


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    colours = np.asarray(palette, dtype=np.float32)[np.clip(mask, 0, len(palette) - 1)]
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)


def save_mask(out: Path, path: str, mask: np.ndarray, palette) -> None:
    """`out/masks/<stem>.png` (class index per pixel) and `out/overlays/<stem>.png`; `mask` is
    at the image's own size."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    mask = mask.astype(np.uint8)
    stem = Path(path).stem
    Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
    Image.fromarray(overlay(read_rgb(path), mask, palette)).save(out / "overlays" / f"{stem}.png")


def write_embeddings(out: Path, embeddings: np.ndarray, paths: list[str]) -> None:
    """`embeddings.npy` (float32, one row per image), `embeddings.csv` (row, path, identity =
    the image's folder name) and `index.faiss`, which `finetune search` queries."""
    out.mkdir(parents=True, exist_ok=True)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    np.save(out / "embeddings.npy", embeddings)
    with (out / "embeddings.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path", "identity"])
        writer.writerows((i, path, Path(path).parent.name) for i, path in enumerate(paths))
    build_index(embeddings, out / "index.faiss")


def build_index(embeddings: np.ndarray, path: Path) -> None:
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])  # exact search; embeddings are unit norm
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    faiss.write_index(index, str(path))


class PredictionFiles:
    """Writes one task's predictions, batch by batch, under `out`.

    `reads`: the network outputs (finetune.models `predict`) the writer needs; only those leave
    the device. `folder`: where under the run folder it writes when no folder is given.
    `one_process`: the files are a whole (an index), so it cannot be written from DDP ranks."""

    reads: tuple[str, ...] = ()
    folder = "predictions"
    one_process = False

    def __init__(self, out: Path, class_names: list[str], palette=None, top_k: int = 5, rank: int | None = None,
                 thresholds: list[float] | None = None):
        self.out = Path(out)
        self.class_names = class_names
        self.palette = palette
        self.top_k = top_k
        self.rank = rank  # under DDP: this process's rank, for files of its own
        self.thresholds = thresholds  # multi-label: each label's decision threshold

    def write(self, paths: list[str], outputs: dict[str, np.ndarray], sizes=None) -> None:
        raise NotImplementedError

    def close(self) -> str:
        """Finish the files; one line saying what was written where."""
        raise NotImplementedError


class ClassCSV(PredictionFiles):
    """`predictions.csv`: path, predicted class, its probability, top-k. Rows are written (and
    flushed) batch by batch, so a long run keeps what it has done; opened on the first batch."""

    reads = ("probabilities",)
    folder = ""

    def header(self) -> list[str]:
        return csv_header(self.top_k)

    def rows(self, paths: list[str], outputs: dict[str, np.ndarray]) -> list[list[str]]:
        return csv_rows(paths, outputs["probabilities"], self.class_names, self.top_k)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = "predictions.csv" if self.rank is None else f"predictions.rank{self.rank}.csv"
        self.path = self.out / name
        self._file = None

    def write(self, paths, outputs, sizes=None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow(self.header())
        self._writer.writerows(self.rows(paths, outputs))
        self._file.flush()

    def close(self) -> str:
        if self._file is not None:
            self._file.close()
            self._file = None
        return f"predictions written to {self.path}"


class LabelSetCSV(ClassCSV):
    """Multi-label `predictions.csv`: path, `labels` (every label at or above its threshold,
    `;`-separated) and `probabilities` (all labels, `label:probability;...`, in class order)."""

    def header(self) -> list[str]:
        return ["path", "labels", "probabilities"]

    def rows(self, paths, outputs) -> list[list[str]]:
        thresholds = self.thresholds if self.thresholds is not None else [0.5] * len(self.class_names)
        return label_set_rows(paths, outputs["probabilities"], self.class_names, thresholds)


class MaskPNGs(PredictionFiles):
    """`masks/<stem>.png` (class index per pixel, at the image's own size) and
    `overlays/<stem>.png` (the class colours over the image)."""

    reads = ("mask",)

    def write(self, paths, outputs, sizes=None) -> None:
        for i, (path, mask) in enumerate(zip(paths, outputs["mask"])):
            if sizes is not None:  # a padded batch: the padding is dropped
                height, width = sizes[i]
                mask = mask[: int(height), : int(width)]
            save_mask(self.out, path, mask, self.palette)

    def close(self) -> str:
        return f"masks written to {self.out / 'masks'}, overlays to {self.out / 'overlays'}"


class EmbeddingIndex(PredictionFiles):
    """`embeddings.npy`, `embeddings.csv` and `index.faiss` (see write_embeddings), at the end."""

    reads = ("embedding",)
    folder = "embeddings"
    one_process = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []
        self.vectors: list[np.ndarray] = []

    def write(self, paths, outputs, sizes=None) -> None:
        self.paths += list(paths)
        self.vectors.append(outputs["embedding"])

    def close(self) -> str:
        if not self.vectors:
            return "no images: no embeddings written"
        write_embeddings(self.out, np.concatenate(self.vectors).astype(np.float32), self.paths)
        return f"{len(self.paths)} embeddings and a FAISS index written to {self.out}"


# A task's contract names one of these (finetune.contract.TaskContract.writer).
WRITERS: dict[str, type[PredictionFiles]] = {
    "csv": ClassCSV, "labels_csv": LabelSetCSV, "masks": MaskPNGs, "embeddings": EmbeddingIndex,
}
