"""Batch-size-weighted running means of per-step scalars, kept on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class RunningMeans:
    """Sums of `value * batch_size` for a fixed list of names, over the interval since the last
    read and over the epoch. Adding is two tensor ops and no host sync; reading divides."""

    def __init__(self, names: list[str]):
        self.names = names
        self._interval: torch.Tensor | None = None
        self._epoch: torch.Tensor | None = None
        self._interval_count = 0
        self._epoch_count = 0

    def add(self, batch_size: int, values: Iterable[torch.Tensor]) -> None:
        weighted = torch.stack([value.detach().float() for value in values]) * batch_size
        self._interval = weighted if self._interval is None else self._interval + weighted
        self._epoch = weighted if self._epoch is None else self._epoch + weighted
        self._interval_count += batch_size
        self._epoch_count += batch_size

    def interval_means(self) -> dict[str, torch.Tensor]:
        """Means since the last call (or the epoch start), then starts a new interval."""
        if self._interval is None:
            return {}
        means = self._interval / self._interval_count
        self._interval, self._interval_count = None, 0
        return dict(zip(self.names, means))

    def epoch_means(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
        """Means over everything added; `reduce` sums sums and counts across processes."""
        if self._epoch is None:
            return {}
        count = torch.tensor([self._epoch_count], dtype=self._epoch.dtype, device=self._epoch.device)
        totals = reduce(torch.cat([self._epoch, count]))
        return dict(zip(self.names, totals[:-1] / totals[-1]))
