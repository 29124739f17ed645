"""The files `finetune predict` writes, as plain functions: the Lightning callbacks (from a
checkpoint) and `finetune predict --exported` (no Lightning) both call them, so the two paths
write the same CSV, mask PNGs and embeddings. Nothing here may import Lightning."""

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
