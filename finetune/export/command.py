"""`finetune export --ckpt_path CKPT --format onnx|torchscript|safetensors|hub [--output PATH]`.

Loads the checkpoint, writes the file with its metadata, then runs it on sample images (the
training data's validation split, or --images) against PyTorch and fails above --tolerance.
`--format hub` writes a Hugging Face Hub folder (timm's layout + model card) and can upload it
(`--push_to_hub user/repo`); `--wandb true` logs what was written as a W&B model artifact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.errors import FinetuneError, OneLineParser
from finetune.export.parity import (
    DEFAULT_TOLERANCE,
    check_file,
    check_rebuilt,
    sample_images,
)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors", "hub": "-hub"}


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser("finetune export", __doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of `finetune fit`")
    parser.add_argument("--format", default="onnx",
                        help="onnx (default) | torchscript | safetensors (weights + YAML) | hub (Hugging Face Hub folder)")
    parser.add_argument("--output", help="file to write (hub: folder); default: the checkpoint's path with the "
                                         "format's suffix (hub: <checkpoint stem>-hub/ beside it)")
    parser.add_argument("--push_to_hub", metavar="USER/REPO", help="hub: upload the folder to this Hub model repo")
    parser.add_argument("--license", help="hub: the model card's license; default: the backbone's pretrained weights' "
                                          "license in timm, else other")
    parser.add_argument("--wandb", type=_bool, default=False,
                        help="true: log what was written as a model artifact of the checkpoint's W&B run (default false)")
    parser.add_argument("--normalize_in_graph", type=_bool, default=True,
                        help="true (default): input uint8 [N,H,W,3] RGB, normalised inside; false: normalised float [N,3,H,W]")
    parser.add_argument("--images", help="sample images for the parity check; default: the training data's val split")
    parser.add_argument("--parity_images", type=int, default=16, help="how many sample images (0: all)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest max abs difference accepted")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise SystemExit(f"finetune export: --format: unknown {args.format!r}; use onnx, torchscript, safetensors or hub")
    if args.format != "hub" and (args.push_to_hub or args.license):
        flag = "--push_to_hub" if args.push_to_hub else "--license"
        raise SystemExit(f"finetune export: {flag}: only with --format hub")
    return args


def output_path(ckpt_path: str, file_format: str, output: str | None) -> Path:
    if not output:
        ckpt = Path(ckpt_path)
        return ckpt.with_name(ckpt.stem + FORMATS[file_format])
    # Readers (and `finetune predict --exported`) tell ONNX from TorchScript by the suffix.
    if (Path(output).suffix == ".onnx") != (file_format == "onnx") and file_format not in ("safetensors", "hub"):
        raise ValueError(f"--output: {output} for --format {file_format}; use a {FORMATS[file_format]} name")
    return Path(output)


def export(args: argparse.Namespace) -> Path:
    from finetune.export.checkpoint import load_checkpoint

    path = output_path(args.ckpt_path, args.format, args.output)
    loaded = load_checkpoint(args.ckpt_path)
    source = args.images or loaded.data_root
    images = sample_images(source, args.parity_images) if source else []
    if not images:
        raise FileNotFoundError(f"--images: no sample images for the parity check under {source!r}; pass --images DIR")
    if args.format == "safetensors":
        from finetune.export.release import load_release, save_release

        weights, config = save_release(loaded, path)
        report = check_rebuilt(loaded, load_release(weights, config), images, args.tolerance)
        written, artifact = f"{weights} + {config}", weights
    elif args.format == "hub":
        report = _export_hub(loaded, args, path, images)
        written = artifact = path
    else:
        written = artifact = _export_graph(loaded, args, path)
        report = check_file(loaded, path, images, args.tolerance)
    size = loaded.preprocessing.input_size
    outputs = ", ".join(loaded.contract.outputs)
    print(f"exported {loaded.contract.name} ({loaded.hparams['backbone']}, {len(loaded.class_names)} classes, "
          f"{'any size' if size is None else f'{size} px'}; outputs {outputs}) to {written}")
    print(report.summary())
    if not report.ok:
        raise SystemExit(f"finetune export: parity check failed for {path}; the file is kept for inspection")
    if args.wandb:
        from finetune.export.wandb_artifact import log_exported

        log_exported(Path(artifact), str(args.ckpt_path), _artifact_metadata(loaded, args.format, report))
    if args.push_to_hub:
        from finetune.export.hub import push_hub_folder

        print(f"uploaded {path} to {push_hub_folder(path, args.push_to_hub)}")
    return path


def _artifact_metadata(loaded, file_format: str, report) -> dict:
    from finetune.export.metadata import plain

    return plain({
        "format": file_format, "task": loaded.contract.name, "backbone": loaded.hparams["backbone"],
        "class_names": loaded.class_names, "preprocessing": loaded.preprocessing.to_dict(),
        "parity": {"engine": report.engine, "images": report.images, "max_abs_diff": report.max_abs_diff},
    })


def _export_hub(loaded, args: argparse.Namespace, folder: Path, images):
    """The folder, then its reload (timm's model where it is ours) against PyTorch, then the card
    with the parity numbers in it."""
    from finetune.export.hub import CARD, reload_hub_folder, write_hub_folder
    from finetune.export.model_card import default_license, model_card, training_record

    hub = write_hub_folder(loaded, folder)
    if hub.fallback:  # one line: what timm gives, and what gives ours
        timm_part = f"timm.create_model('local-dir:{folder}') gives {hub.timm_gives}" if hub.timm_gives else "timm cannot load it"
        print(f"note: {timm_part} ({hub.fallback}); finetune.export.hub.load_hub_folder('{folder}') gives the fine-tuned network")
    report = check_rebuilt(loaded, reload_hub_folder(hub, loaded), images, args.tolerance)
    report.engine = "timm.create_model('local-dir:')" if hub.loader == "timm" else "load_hub_folder"
    record = training_record(args.ckpt_path, loaded.contract.monitor)
    license_ = args.license or default_license(loaded.hparams["backbone"])
    (folder / CARD).write_text(model_card(loaded, hub, report, record, license_, args.push_to_hub))
    return report


def _export_graph(loaded, args: argparse.Namespace, path: Path) -> Path:
    from finetune.export.graph import ExportGraph
    from finetune.export.metadata import build_metadata

    prep = loaded.preprocessing
    graph = ExportGraph(loaded.network, loaded.contract.outputs, prep.mean, prep.std, args.normalize_in_graph)
    metadata = build_metadata(loaded, args.format, args.normalize_in_graph)
    if args.format == "onnx":
        from finetune.export.onnx import export_onnx

        return export_onnx(graph, path, metadata, min_size=metadata.get("min_input_size") or 16)
    from finetune.export.torchscript import export_torchscript

    return export_torchscript(graph, path, metadata)


def main(argv: list[str]) -> None:
    """Returns None: the console script exits with what main() returns."""
    args = parse_args(argv)
    try:
        export(args)
    except (FileNotFoundError, ValueError, TypeError, FinetuneError) as err:
        raise SystemExit(f"finetune export: {err}") from None
