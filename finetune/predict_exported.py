"""`finetune predict --exported FILE --input DIR [--output DIR]`: predictions from an exported
ONNX or TorchScript file, written as `finetune predict` writes them from a checkpoint
(predictions.csv; masks/ + overlays/; embeddings.npy/.csv + index.faiss), without Lightning.

`python -m finetune.predict_exported --exported FILE --input DIR` is the same without the
`finetune` command, whose module imports Lightning before it dispatches here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.data.folder import list_images
from finetune.errors import OneLineParser
from finetune.export.runtime import ExportedModel
from finetune.writers import WRITERS

# Files exported before the metadata named its writer.
_WRITER_OF_TASK = {"classification": "csv", "segmentation": "masks", "embedding": "embeddings"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser("finetune predict --exported FILE", __doc__, command="finetune predict")
    parser.add_argument("--exported", required=True, help=".onnx or TorchScript file of `finetune export`")
    parser.add_argument("--input", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output", default="predictions", help="folder for the outputs (default: predictions)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=5, help="classification: classes listed per image")
    return parser.parse_args(argv)


def predict(model: ExportedModel, paths: list[Path], out: Path, batch_size: int = 16, top_k: int = 5) -> str:
    """Writes the outputs under `out` with the writer the file's metadata names (as `finetune
    predict` from a checkpoint does); returns the writer's line on what it wrote."""
    meta = model.metadata
    name = meta.get("writer") or _WRITER_OF_TASK.get(model.task)
    if name not in WRITERS:
        raise ValueError(f"--exported: {model.path} names writer {name!r}, which this finetune does not have; upgrade finetune")
    files = WRITERS[name](out, meta["class_names"], meta.get("palette"), top_k, thresholds=meta.get("thresholds"))
    for names, images in model.batches(paths, batch_size):  # masks come out at each image's size
        files.write(names, model.run(images))
    return files.close()


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
    print(f"{len(paths)} images, {model.task} ({model.engine}): {written}")


if __name__ == "__main__":
    main()
