"""`finetune interpret --ckpt_path CKPT [--split train|val|test] [--output DIR] [--batch_size N]
[--device cpu|cuda|auto] [--data_root DIR]`: learn from a run.

Runs the checkpoint's network over one split of its own training data (the checkpoint's
DataModule, rebuilt from its saved config; evaluation transforms, in order) and writes, to
DIR (default: the run's `report/` folder):

- interpret-<split>.csv: every image, highest loss first, with `likely_mislabelled`
  (confident learning: finetune/interpretation.py);
- confused-<split>.csv: the (true, predicted) pairs the model confuses, most first;
- top_losses-<split>.png: the 9 highest-loss images, captioned true/predicted/p/loss.

Single-label classification checkpoints only. `interpret_module` does the same in-process,
for a callback at the end of fit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import OneLineParser
from finetune.interpretation import Interpretation

SPLITS = ("train", "val", "test")
SUPPORTED = "single-label classification (finetune.tasks.ClassificationTask)"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images, got {text!r}")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser("finetune interpret", __doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of `finetune fit`")
    parser.add_argument("--split", default="val", choices=SPLITS, help="a split of the training data (default: val)")
    parser.add_argument("--output", help="folder to write to; default: the run's report/ (next to checkpoints/)")
    parser.add_argument("--batch_size", type=_positive, help="default: the data config's")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (default): cuda if any")
    parser.add_argument("--data_root", help="where the data is now, if it moved since training (replaces data.root)")
    return parser.parse_args(argv)


# -- the network over a loader: shared by the command and interpret_module ---------------------


def collect(
    predict: Callable, loader, prepare: Callable, device: torch.device, class_names: list[str]
) -> Interpretation:
    """`predict(images)["probabilities"]` over `loader`'s batches ({"image", "label"[, "path"]}).

    `prepare`: the uint8 batch on the device -> the network's input (the DataModule's on-device
    normalisation). Paths are the batch's, or else the dataset's items in loader order (an
    evaluation loader is not shuffled)."""
    items = getattr(loader.dataset, "items", None)
    probabilities, labels, paths = [], [], []
    with torch.inference_mode():
        for batch in loader:
            label = torch.as_tensor(batch["label"])
            if label.dim() != 1 or label.is_floating_point():
                raise ValueError(f"interpret: labels of shape {tuple(label.shape)}; only {SUPPORTED} is supported")
            images = prepare(batch["image"].to(device, non_blocking=True))
            probabilities.append(predict(images)["probabilities"].float().cpu())
            labels.append(label.cpu())
            start = len(paths)
            if "path" in batch:  # a bad file was replaced by the next one: the batch names what it holds
                paths += [str(path) for path in batch["path"]]
            else:
                paths += [str(items[i][0]) if items is not None else str(i) for i in range(start, start + len(label))]
    if not labels:
        raise ValueError("interpret: the loader gave no batches")
    return Interpretation(torch.cat(probabilities), torch.cat(labels), paths, list(class_names))


def normalizer(mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (what finetune's datasets give) normalised as on the device in training."""
    from finetune.data.normalize import normalize_images

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, mean, std) if images.dtype == torch.uint8 else images.float()

    return prepare


def interpret_module(pl_module, dataloader) -> Interpretation:
    """`pl_module` (a finetune ClassificationTask) over `dataloader` (an unshuffled evaluation
    loader: the val loader), in eval mode; the module's train/eval mode is restored after.
    Under DDP a rank's val loader holds its share of the split only: pass the whole split's."""
    from finetune.contract import class_names_of
    from finetune.preprocessing import Preprocessing

    if pl_module.contract.name != "classification":
        raise ValueError(f"interpret: {type(pl_module).__name__} is a {pl_module.contract.name} task; "
                         f"only {SUPPORTED} is supported")
    preprocessing = pl_module.hparams.get("preprocessing")
    source = Preprocessing.from_dict(preprocessing) if preprocessing else pl_module.trainer.datamodule
    was_training = pl_module.training
    # The task's own eval()/train(): its train() puts frozen BatchNorm back the way the schedule says.
    pl_module.eval()
    try:
        return collect(pl_module.net.predict, dataloader, normalizer(source.mean, source.std), pl_module.device,
                       class_names_of(pl_module.hparams))
    finally:
        pl_module.train(was_training)


# -- the command --------------------------------------------------------------------------


def _fail(message: str) -> SystemExit:
    return SystemExit(f"finetune interpret: {message}")


def rebuild_datamodule(loaded, ckpt_path: str, data_root: str | None, batch_size: int | None):
    """The checkpoint's DataModule from its saved class path and arguments (`data_root`,
    `batch_size`: replacements)."""
    from finetune.contract import import_class
    from finetune.errors import user_message

    data = loaded.config.get("data")
    if not data or not data.get("class_path"):
        raise _fail(f"--ckpt_path: {ckpt_path} holds no DataModule class and arguments (a DataModule built in "
                    "Python saves none); interpret a checkpoint written by `finetune fit`")
    init_args = dict(data["init_args"])
    root = init_args.get("root")
    if data_root is not None:
        if not Path(data_root).expanduser().is_dir():
            raise _fail(f"--data_root: {data_root} is not a folder")
        init_args["root"] = data_root
    elif root and not Path(root).expanduser().is_dir():
        raise _fail(f"data.root: {root} (where the checkpoint was trained) is not a folder; if the data moved, "
                    "pass --data_root NEW_FOLDER")
    if batch_size is not None:
        init_args["batch_size"] = batch_size
    try:
        datamodule_class = import_class(data["class_path"])
    except ValueError as err:
        raise _fail(f"--ckpt_path: the checkpoint's DataModule {err}") from None
    try:
        # The saved seed and val_fraction: a folder split here is the split trained on.
        return datamodule_class(**init_args)
    except Exception as err:
        message = user_message(err)  # the DataModule's own one line (`data.manifest: ... does not exist`)
        if message is None:
            raise  # a bug keeps its traceback
        raise _fail(message) from None


def split_loader(datamodule, split: str):
    """The split's items as evaluated (eval transform, no augmentation), in order."""
    from finetune.data.loader import data_loader

    items = getattr(datamodule.splits, split)
    if not items:
        raise _fail(f"--split {split}: the data ({datamodule.hparams.get('root') or 'data'}) has no {split} images; "
                    f"use one of {', '.join(name for name in SPLITS if getattr(datamodule.splits, name))}")
    dataset = datamodule.dataset(items, train=False)
    return data_loader(datamodule, dataset, shuffle=False, collate_fn=datamodule.collate_fn())


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def output_folder(ckpt_path: str, output: str | None) -> Path:
    """--output, or the run's report/: runs/<name>/checkpoints/last.ckpt -> runs/<name>/report."""
    if output:
        return Path(output)
    ckpt = Path(ckpt_path)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "report"


def interpret(args: argparse.Namespace) -> tuple[Interpretation, dict[str, Path]]:
    from finetune.export.checkpoint import load_checkpoint

    try:
        loaded = load_checkpoint(args.ckpt_path)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise _fail(str(err)) from None
    if loaded.contract.name != "classification":
        raise _fail(f"--ckpt_path: {args.ckpt_path} is a {loaded.contract.name} checkpoint; "
                    f"interpret supports {SUPPORTED} only")
    device = _device(args.device)
    datamodule = rebuild_datamodule(loaded, args.ckpt_path, args.data_root, args.batch_size)
    if list(datamodule.class_names) != loaded.class_names:
        raise _fail(f"data.root: the data now has classes {datamodule.class_names}, the checkpoint was trained on "
                    f"{loaded.class_names}; point --data_root at the data it was trained on")
    network = loaded.network.to(device).eval()
    result = collect(network.predict, split_loader(datamodule, args.split), normalizer(datamodule.mean, datamodule.std),
                     device, loaded.class_names)
    folder = output_folder(args.ckpt_path, args.output)
    folder.mkdir(parents=True, exist_ok=True)
    written = {
        "samples": result.write_csv(folder / f"interpret-{args.split}.csv"),
        "confused": result.write_confused_csv(folder / f"confused-{args.split}.csv"),
        "figure": result.top_losses_figure(folder / f"top_losses-{args.split}.png", k=9),
    }
    return result, written


def summary(result: Interpretation, split: str, written: dict[str, Path]) -> list[str]:
    """What the command prints: counts, the top confused pairs, the likely mislabelled, the files."""
    total = len(result.paths)
    correct = int((result.predicted == result.labels).sum())
    confused = result.most_confused()
    pairs = ", ".join(f"{true} as {predicted} ({count})" for true, predicted, count in confused[:3]) or "none"
    doubtful = result.likely_mislabelled()
    first = ""
    if doubtful:
        first = f"; most doubtful: {doubtful[0].path} (labelled {doubtful[0].true}, looks {doubtful[0].predicted})"
    return [
        f"{split}: {total} images, {correct} predicted right ({correct / total:.1%}), "
        f"{len(result.class_names)} classes",
        f"most confused (true as predicted): {pairs}",
        f"likely mislabelled (confident learning): {len(doubtful)}{first}",
        f"wrote {written['samples']} (highest loss first), {written['confused'].name}, {written['figure'].name}",
    ]


def main(argv: list[str]) -> None:
    """Returns None: the console script exits with what main() returns."""
    args = parse_args(argv)
    result, written = interpret(args)
    print("\n".join(summary(result, args.split, written)))
