"""`finetune predict --exported FILE --input DIR [--output DIR]`: predictions from an exported
ONNX or TorchScript file, written as `finetune predict` writes them from a checkpoint
(predictions.csv; masks/ + overlays/; embeddings.npy/.csv + index.faiss), without Lightning.

`python -m finetune.predict_exported --exported FILE --input DIR` is the same without the
`finetune` command, whose module imports Lightning before it dispatches here.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from finetune.callbacks.outputs import csv_header, csv_rows, save_mask, write_embeddings
from finetune.data.folder import list_images
from finetune.export.runtime import ExportedModel


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SystemExit(f"finetune predict: {message} (see finetune predict --exported FILE --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineParser(prog="finetune predict --exported", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exported", required=True, help=".onnx or TorchScript file of `finetune export`")
    parser.add_argument("--input", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output", default="predictions", help="folder for the outputs (default: predictions)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=5, help="classification: classes listed per image")
    return parser.parse_args(argv)


def predict(model: ExportedModel, paths: list[Path], out: Path, batch_size: int = 16, top_k: int = 5) -> Path:
    """Writes the task's outputs under `out`; returns the main file or folder written."""
    meta = model.metadata
    batches = ((names, model.run(images)) for names, images in model.batches(paths, batch_size))
    out.mkdir(parents=True, exist_ok=True)
    if model.task == "classification":
        target = out / "predictions.csv"
        with target.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(csv_header(top_k))
            for names, outputs in batches:
                writer.writerows(csv_rows(names, outputs["probabilities"], meta["class_names"], top_k))
        return target
    if model.task == "segmentation":  # masks come out at each image's size: nothing to crop
        for names, outputs in batches:
            for name, mask in zip(names, outputs["mask"]):
                save_mask(out, name, mask, meta["palette"])
        return out / "masks"
    names, vectors = [], []
    for batch_names, outputs in batches:
        names += batch_names
        vectors.append(outputs["embedding"])
    write_embeddings(out, np.concatenate(vectors), names)
    return out


def main(argv: list[str] | None = None) -> None:
    """Returns None: the console script exits with what main() returns."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model = ExportedModel(args.exported)
        folder = Path(args.input)
        if not folder.is_dir():
            raise FileNotFoundError(f"--input: {folder} is not a folder; pass a folder of images")
        paths = list_images(folder)
        if not paths:
            raise FileNotFoundError(f"--input: no images under {folder}")
        written = predict(model, paths, Path(args.output), args.batch_size, args.top_k)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"finetune predict: {err}") from None
    print(f"{len(paths)} images, {model.task} ({model.engine}): written to {written}")


if __name__ == "__main__":
    main()
