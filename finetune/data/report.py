"""What is in a data folder and what is wrong with it, as a report: images per split and class,
imbalance, skipped files, duplicates, small images; fatal problems. Built from a DataModule's
splits and its screening (finetune.data.screening); `finetune check-data` prints it whole,
a training run logs a few lines of it."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from finetune.data.screening import Screening
from finetune.data.splits import Splits

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    root: str
    datamodule: str
    checked: str = ""  # "headers" or "every pixel"
    files: int = 0
    seconds: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    pixels: dict[str, dict[str, float]] = field(default_factory=dict)  # segmentation: split -> class -> share
    imbalance: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    small: dict = field(default_factory=dict)
    crop: dict = field(default_factory=dict)  # far-from-square training images and the crop policy (_crop_advice)
    warnings: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _duplicates(screen: Screening, where: dict[str, tuple[str, str]]) -> list[dict]:
    """Groups of files with the same bytes; `where`: path -> (split, class)."""
    groups = defaultdict(list)
    for path, facts in screen.facts.items():
        if facts.digest is not None and path in where:
            groups[facts.digest].append(path)
    found = []
    for paths in sorted(sorted(g) for g in groups.values() if len(g) > 1):
        splits = sorted({where[p][0] for p in paths})
        classes = sorted({where[p][1] for p in paths})
        found.append({"paths": paths, "splits": splits, "classes": classes})
    return found


def _imbalance(counts: dict[str, int]) -> dict | None:
    present = {name: n for name, n in counts.items() if n > 0}
    if len(present) < 2:
        return None
    largest, smallest = max(present, key=present.get), min(present, key=present.get)
    return {"ratio": round(present[largest] / present[smallest], 2), "largest": largest, "smallest": smallest,
            "largest_count": present[largest], "smallest_count": present[smallest]}


# RandomResizedCrop's widest box: an image wider (or taller) than this loses part of its long
# side to every crop, and to the evaluation's centre crop.
SQUARE_ENOUGH = 4 / 3
MANY = 0.2  # share of far-from-square training images above which `data.crop: whole` is suggested


def _crop_advice(screen: Screening, paths: list[str], crop: str, crop_pct: float) -> dict:
    """How much the evaluation's centre crop cuts from far-from-square training images, and
    whether to train and evaluate on the whole image instead. Needs the sizes that full
    screening keeps (check-data, small sets): {} without them."""
    aspects = [max(f.width, f.height) / min(f.width, f.height) for f in map(screen.facts.get, paths)
               if f is not None and f.problem is None and min(f.width, f.height) > 0]
    if not aspects:
        return {}
    far = [a for a in aspects if a > SQUARE_ENOUGH]
    # Short side resized to size / crop_pct, then size x size kept: crop_pct / aspect of the long side.
    dropped = 1 - crop_pct / max(far) if far else 0.0
    share = len(far) / len(aspects)
    return {"far_from_square": len(far), "share": round(share, 3), "crop": crop, "crop_pct": crop_pct,
            "long_side_dropped": round(dropped, 3),
            "suggest": "--data.crop whole" if crop == "random_resized" and share >= MANY else None}


def crop_line(crop: dict) -> str | None:
    """The report's one line on the crop policy, when it suggests a change."""
    if not crop.get("suggest"):
        return None
    return (f"{crop['far_from_square']} training images ({crop['share']:.0%}) are far from square (aspect > 4:3): "
            f"the evaluation's centre crop (crop_pct {crop['crop_pct']}) drops up to {crop['long_side_dropped']:.0%} "
            f"of their long side; if evidence can lie at the border, try {crop['suggest']} (whole images, squashed)")


def _finish(report: DataReport, screen: Screening, where: dict[str, tuple[str, str]], meaning: str) -> DataReport:
    report.checked = "every pixel" if screen.full else "headers"
    report.files, report.seconds = screen.files, round(screen.seconds, 3)
    report.skipped = screen.bad_files.as_rows()
    report.duplicates = _duplicates(screen, where)
    report.small = {
        "min_side": screen.min_side, "count": screen.small_count, "meaning": meaning,
        "examples": [{"path": f.path, "width": f.width, "height": f.height}
                     for f in sorted(screen.small, key=lambda f: min(f.height, f.width))[:20]],
    }
    w = report.warnings
    if report.skipped:
        w.append(f"{len(report.skipped)} files skipped: they cannot be used")
    if report.imbalance and report.imbalance["ratio"] >= 10:
        i = report.imbalance
        # Measured at 1:10 (benchmarks/recipes.py): either raised balanced accuracy by ~0.2.
        advice = {"pixels": "", "labels": "; try --model.pos_weight auto"}.get(
            i.get("measure"), "; try --model.class_weights auto or --data.sampler balanced")
        w.append(f"class imbalance: {i['largest']} has {i['ratio']}x the training images of {i['smallest']}{advice}")
    leaks = [d for d in report.duplicates if len(d["splits"]) > 1]
    conflicts = [d for d in report.duplicates if len(d["classes"]) > 1]
    if report.duplicates:
        w.append(f"{len(report.duplicates)} group(s) of identical files ({len(leaks)} across splits, "
                 f"{len(conflicts)} with different classes)")
    if screen.small_count:
        w.append(f"{screen.small_count} images smaller than {screen.min_side} px on a side")
    if "val" in report.counts and not sum(report.counts["val"].values()):
        w.append("no validation images")
    return report


def _label_indices(label: int | tuple[int, ...]) -> tuple[int, ...]:
    """The labels of an item: its class, or a multi-label item's labels."""
    return label if isinstance(label, tuple) else (label,)


def folder_report(root: str, datamodule: str, splits: Splits, screen: Screening,
                  crop: tuple[str, float] | None = None) -> DataReport:
    """Classification and identity folders, manifests: `splits` of (path, class index) samples,
    or (path, label indices) for multi-label (counts are then images per label). `crop`:
    (data.crop, crop_pct), to advise on the crop policy."""
    report = DataReport(str(root), datamodule)
    where = {}
    for split, samples in splits.items():
        names = splits.val_names if split == "val" and splits.val_names is not None else splits.class_names
        counts = Counter(i for _, label in samples for i in _label_indices(label))
        if samples or split != "test":
            report.counts[split] = {name: counts[i] for i, name in enumerate(names)}
        if screen.facts:  # duplicates are found among fully screened files only: 1.4 s at 1M files otherwise
            where.update({path: (split, "+".join(names[i] for i in _label_indices(label))) for path, label in samples})
    report.imbalance = _imbalance(report.counts["train"])
    if report.imbalance and any(isinstance(label, tuple) for _, label in splits.train):
        report.imbalance.update(measure="labels")  # images per label, of multi-label items
    if crop is not None:
        report.crop = _crop_advice(screen, [path for path, _ in splits.train], *crop)
    report.fatal += [f"class {name!r} has no readable training image" for name, n in report.counts["train"].items()
                     if not n]
    return _finish(report, screen, where, "upscaled to the input size")


def segmentation_report(root: str, datamodule: str, splits: Splits, class_names: list[str],
                        screen: Screening) -> DataReport:
    """(image, mask) `splits`: images per split; with every pixel read, the images and pixel
    share of each class."""
    report = DataReport(str(root), datamodule)
    where = {}
    for split, pairs in splits.items():
        if not pairs and split == "test":
            continue
        images, pixels = Counter(), Counter()
        for image, mask in pairs:
            where[image] = (split, "")
            facts = screen.facts.get(mask)
            for value, n in ((facts.labels or {}) if facts else {}).items():
                if value < len(class_names):
                    images[value] += 1
                    pixels[value] += n
        total = sum(pixels.values())
        per_class = {name: images[i] for i, name in enumerate(class_names)}
        report.counts[split] = per_class if screen.full else {"images": len(pairs)}
        if total:
            report.pixels[split] = {name: round(pixels[i] / total, 4) for i, name in enumerate(class_names)}
    if report.pixels.get("train"):
        report.imbalance = _imbalance({k: round(v * 1e6) for k, v in report.pixels["train"].items()})
        if report.imbalance:
            report.imbalance.update(measure="pixels")
    if not splits.train:
        report.fatal.append("no readable image/mask pair for training")
    return _finish(report, screen, where, "below the network's output stride: little context, padded in batches")


def log_report(report: DataReport) -> None:
    """The report as a few log lines: what a run's log should say about its data."""
    log.info("%s: %s of %d files checked in %.2f s", report.root, report.checked, report.files, report.seconds)
    if report.imbalance and report.imbalance["ratio"] > 1:
        i = report.imbalance
        log.info("largest class %s is %.1fx the smallest, %s (%s)", i["largest"], i["ratio"], i["smallest"],
                 "by pixels" if i.get("measure") == "pixels" else f"{i['largest_count']} vs {i['smallest_count']} training images")
    if report.skipped:
        kinds = Counter(re.split(r"[:;(]", s["reason"])[0].strip() for s in report.skipped)
        shown = ", ".join(os.path.relpath(s["path"], report.root) for s in report.skipped[:3])
        more = f" and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
        log.warning("skipped %d unusable files (%s): %s%s; `finetune check-data` shows why", len(report.skipped),
                    ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()), shown, more)
    for duplicate in report.duplicates[:3]:
        paths = duplicate["paths"]
        more = f" (and {len(paths) - 4} more)" if len(paths) > 4 else ""  # a log line, not the whole group
        log.warning("identical files (%s; %s): %s%s", "/".join(duplicate["splits"]), "/".join(duplicate["classes"]) or "-",
                    " = ".join(os.path.relpath(p, report.root) for p in paths[:4]), more)
    if len(report.duplicates) > 3:
        log.warning("%d more groups of identical files: `finetune check-data` lists them", len(report.duplicates) - 3)
    if line := crop_line(report.crop):
        log.info(line)
    small = report.small
    if small.get("count"):
        first = small["examples"][0]
        log.info("%d images are smaller than %d px on a side (smallest %dx%d: %s)", small["count"], small["min_side"],
                 first["width"], first["height"], os.path.relpath(first["path"], report.root))
