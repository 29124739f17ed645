"""`finetune check-data --config CONFIG [--data.* ...] [--json PATH] [--refresh_cache true]`: the data a
fit would use, checked.

It takes `finetune fit`'s config and flags, but builds the DataModule alone: no model, no
Trainer, no weights to fetch. Every file is read the way training reads it and hashed, so the
report lists unreadable files, mask problems, duplicates (within and across splits), images
too small for the model, the images per class, and whether far-from-square images call for
`--data.crop whole`. `--json PATH` writes the report as JSON (`--json -`: to stdout, instead
of the table). The exit status is 1 when the data cannot be trained on at all (no images, one
class, a class with no readable image, ...), else 0: files that training would skip are
reported, not fatal.

What each file's screening found is kept in the screening cache (finetune.data.screening_cache),
which training then reads: a file is opened again only when it changed. `--refresh_cache true`
opens every file again and rewrites the cache.
"""

from __future__ import annotations

import json
import logging
import os
import statistics

from rich.console import Console
from rich.table import Table

from finetune.contract import contract_of, import_class
from finetune.data.report import DataReport, crop_line
from finetune.data.screening import screening

log = logging.getLogger(__name__)
MAX_ROWS = 40  # per table; the JSON has everything


def _add_arguments(parser) -> None:
    parser.add_argument("--json", type=str | None, default=None,
                        help="check-data: write the report as JSON to this file ('-': to stdout, no table)")
    parser.add_argument("--refresh_cache", type=bool, default=False,
                        help="check-data: open every file again and rewrite the screening cache")


def _parse(args: list[str] | None):
    """The `data` section (class and arguments), the model's smallest input side (its contract's
    `min_input_size`: a segmentation network's output stride), --json and --refresh_cache,
    parsed as `finetune fit` parses them (same parser, same one-line errors), nothing instantiated."""
    from finetune.cli import create_cli  # Lightning: imported only when the command runs

    cli = create_cli(args, run=False, instantiate=False, extra_arguments=_add_arguments)
    data, model = cli.config.data, cli.config.model
    min_side = contract_of(model.class_path).min_input_size(dict(model.init_args.as_dict()))
    return (import_class(data.class_path), dict(data.init_args.as_dict()), min_side, cli.config.json,
            cli.config.refresh_cache)


def build(cls, kwargs: dict, min_side: int | None = None, refresh_cache: bool = False) -> DataReport:
    """The full report on the data `cls(**kwargs)` reads; a fatal problem is a report with `fatal` set.

    `min_side`: count the images smaller than this (the model's smallest input, e.g. a
    segmentation network's output stride, which the DataModule does not know); None: the
    DataModule's own smallest side. `refresh_cache`: screen every file again, whatever the
    screening cache holds, and rewrite it."""
    kwargs = {**kwargs, "on_bad_image": "skip"}  # report every bad file, don't stop at the first
    quiet = logging.getLogger("finetune.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the report says it all, once
    try:
        with screening("full", min_side=min_side, refresh_cache=refresh_cache):
            dm = cls(**kwargs)
    except (ValueError, FileNotFoundError) as error:
        return DataReport(str(kwargs.get("root")), cls.__name__, fatal=[str(error)])
    finally:
        quiet.setLevel(level)
    return dm.report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _rel(path: str, root: str) -> str:
    """`path` from the data folder (a manifest's: the folder it is in); a bad row (`file:line`) as it is."""
    if os.path.isfile(root):
        root = os.path.dirname(root)
    if not os.path.isabs(path) and not os.path.exists(path):
        return path
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _counts_table(report: DataReport) -> Table:
    splits = [s for s, counts in report.counts.items() if counts]
    names = list(dict.fromkeys(n for s in splits for n in report.counts[s]))
    title = "Images per class" if not report.pixels else "Images containing each class (pixel share)"
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    shown = names
    if len(names) > MAX_ROWS:  # identities: thousands; show the extremes
        train = report.counts.get("train", {})
        ranked = sorted(names, key=lambda n: train.get(n, 0))
        shown = ranked[: MAX_ROWS // 2] + ranked[-MAX_ROWS // 2:]
    for name in shown:
        cells = []
        for split in splits:
            n = report.counts[split].get(name)
            share = report.pixels.get(split, {}).get(name)
            cells.append("" if n is None else f"{n}" + (f" ({share:.1%})" if share is not None else ""))
        table.add_row(name, *cells)
    if len(shown) < len(names):
        table.caption = f"{len(names)} classes: the {MAX_ROWS // 2} smallest and largest in train shown"
    return table


def _summary(counts: dict[str, int]) -> str:
    values = sorted(counts.values())
    if not values:
        return "none"
    return (f"{len(values)} classes, {sum(values)} images; per class min {values[0]}, "
            f"median {statistics.median(values):g}, max {values[-1]}; {sum(v == 1 for v in values)} with a single image")


def render(report: DataReport, console: Console) -> None:
    root = report.root
    console.print(f"[bold]finetune check-data[/bold] {root} ({report.datamodule})")
    if report.checked:
        console.print(f"{report.checked} of {report.files} files checked in {report.seconds:.2f} s")
    if report.counts:
        console.print(_counts_table(report))
        for split, counts in report.counts.items():
            if len(counts) > MAX_ROWS:
                console.print(f"  {split}: {_summary(counts)}")
    if report.imbalance:
        i = report.imbalance
        measure = "pixels" if i.get("measure") == "pixels" else f"{i['largest_count']} vs {i['smallest_count']} training images"
        if i["ratio"] > 1:
            console.print(f"Imbalance: {i['largest']} / {i['smallest']} = {i['ratio']}x ({measure})")
        else:
            console.print("Balanced: every class has as many training images")
    if report.skipped:
        table = Table(title=f"Skipped: {_n(len(report.skipped), 'file')} (or folders) training cannot use", title_justify="left")
        for column in ("path", "kind", "reason"):
            table.add_column(column, overflow="fold")
        for row in report.skipped[:MAX_ROWS]:
            table.add_row(_rel(row["path"], root), row["kind"], row["reason"])
        console.print(table)
    if report.duplicates:
        table = Table(title=f"Identical files: {_n(len(report.duplicates), 'group')}", title_justify="left")
        for column in ("files", "splits", "classes"):
            table.add_column(column, overflow="fold")
        for group in report.duplicates[:MAX_ROWS]:
            across = " [red](leak)[/red]" if len(group["splits"]) > 1 else ""
            conflict = " [red](conflicting labels)[/red]" if len(group["classes"]) > 1 else ""
            table.add_row(" = ".join(_rel(p, root) for p in group["paths"]), ", ".join(group["splits"]) + across,
                          ", ".join(c for c in group["classes"] if c) + conflict)
        console.print(table)
    small = report.small
    if small.get("count"):
        examples = ", ".join(f"{_rel(e['path'], root)} {e['width']}x{e['height']}" for e in small["examples"][:5])
        console.print(f"Small: {_n(small['count'], 'image')} under {small['min_side']} px on a side, {small['meaning']} "
                      f"(smallest: {examples})")
    if line := crop_line(report.crop):
        console.print(f"Crop: {line}")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}")
    for fatal in report.fatal:
        console.print(f"[red bold]fatal[/red bold]: {fatal}")
    console.print("[red]fatal problems: no training can use this data (exit 1)[/red]" if report.fatal
                  else "[green]no fatal problem: training can use this data[/green]")


def main(args: list[str] | None = None) -> int:
    """`args` as after `finetune check-data`; None: sys.argv[1:]."""
    cls, kwargs, stride, json_path, refresh_cache = _parse(args)
    report = build(cls, kwargs, stride, refresh_cache)
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if json_path == "-":
        print(text)
    else:
        render(report, Console())
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 1 if report.fatal else 0
