"""The metrics of every epoch, kept by the report itself so that it needs no logger."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

INDEX_COLUMNS = ("epoch", "step")


class MetricHistory:
    """Rows of scalar metrics, each with the (0-based) epoch and global step it was taken at:
    one row per validation and one per training epoch, as Lightning's CSVLogger writes them."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = [dict(row) for row in rows or []]

    def add(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.rows.append({"epoch": int(epoch), "step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def names(self) -> list[str]:
        """Metric names in the order they first appeared."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update((key, None) for key in row if key not in INDEX_COLUMNS)
        return list(seen)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of the rows that hold `name`."""
        rows = [row for row in self.rows if name in row]
        return [row["epoch"] for row in rows], [row[name] for row in rows]

    def latest(self) -> dict[str, float]:
        """Each metric's last value."""
        values: dict[str, float] = {}
        for row in self.rows:
            values.update((key, value) for key, value in row.items() if key not in INDEX_COLUMNS)
        return values

    def write_csv(self, path: Path) -> None:
        """epoch, step, then the metrics sorted by name; a blank where a row lacks one."""
        columns = [*INDEX_COLUMNS, *sorted(self.names())]
        with Path(path).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)


def scalar_metrics(metrics: Mapping, prefix: str) -> dict[str, float]:
    """The one-number values of `metrics` (tensors or numbers) whose names start with `prefix`,
    without Lightning's per-step copies (`*_step`): the epoch values are what a curve shows."""
    values = {}
    for name, value in metrics.items():
        if not name.startswith(prefix) or name.endswith("_step"):
            continue
        if hasattr(value, "numel"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            values[name] = float(value)
    return values
