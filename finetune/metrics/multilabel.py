"""Multi-label metrics, through torchmetrics: mAP (macro and micro), F1 (macro and micro) and the
exact-match ratio at the decision thresholds, per-label AP and F1, and the F1-best threshold of
each label.

Two things torchmetrics does not do as this task needs, and are done here on top of it:

- macro mAP averages over the labels that have a positive image in the evaluated set.
  A label without one has no defined AP; torchmetrics scores it 0 and averages it in, so a
  validation split that happens to lack a rare label would pull the mean down for nothing
  (VOC, COCO and the ASL paper's evaluation leave such labels out too).
- decisions at one threshold per label: torchmetrics' F1 takes one threshold for all labels, so
  the predictions are binarised here, against each label's own, and handed over as 0/1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecisionRecallCurve,
    MultilabelStatScores,
)

# Candidate thresholds for tuning (0, 0.01, ..., 1): a binned curve keeps constant memory and
# sums exactly across DDP ranks.
THRESHOLD_STEPS = 101


class MultiLabelMetrics(nn.Module):
    """All the multi-label metrics of one evaluation (validation or test), updated together from
    logits and multi-hot targets. `thresholds`: a [labels] buffer the task keeps current; the
    F1s and exact match decide `probability >= threshold` per label. `tune`: also keep the
    binned precision-recall curve `best_thresholds` reads."""

    def __init__(self, num_labels: int, tune: bool = False):
        super().__init__()
        self.register_buffer("thresholds", torch.full((num_labels,), 0.5), persistent=False)
        self.ap = MultilabelAveragePrecision(num_labels, average=None)
        self.ap_micro = MultilabelAveragePrecision(num_labels, average="micro")
        self.f1 = MultilabelF1Score(num_labels, average=None)
        self.f1_micro = MultilabelF1Score(num_labels, average="micro")
        self.exact_match = MultilabelExactMatch(num_labels)
        # Positives per label (its `support`), to leave labels without one out of the macro mean.
        self.counts = MultilabelStatScores(num_labels, average=None)
        self.curve = MultilabelPrecisionRecallCurve(num_labels, thresholds=THRESHOLD_STEPS) if tune else None

    def update(self, logits: Tensor, targets: Tensor) -> None:
        probabilities = logits.float().sigmoid()
        labels = targets.round().long()  # mixed or smoothed targets never reach evaluation, but be exact
        decisions = (probabilities >= self.thresholds).float()  # exactly 0/1: the metrics' own 0.5 keeps them
        self.ap.update(probabilities, labels)
        self.ap_micro.update(probabilities, labels)
        self.f1.update(decisions, labels)
        self.f1_micro.update(decisions, labels)
        self.exact_match.update(decisions, labels)
        self.counts.update(decisions, labels)
        if self.curve is not None:
            self.curve.update(probabilities, labels)

    def compute(self) -> dict[str, Tensor]:
        """Scalars `map`, `map_micro`, `f1`, `f1_micro`, `exact_match`; per-label `ap` and
        `f1_class` ([labels]); `positives` ([labels])."""
        ap, f1, positives = self.ap.compute(), self.f1.compute(), self.positives()
        present = positives > 0
        return {
            "map": macro_mean(ap, present),
            "map_micro": self.ap_micro.compute(),
            "f1": macro_mean(f1, present),
            "f1_micro": self.f1_micro.compute(),
            "exact_match": self.exact_match.compute(),
            "ap": ap,
            "f1_class": f1,
            "positives": positives,
        }

    def best_thresholds(self) -> tuple[Tensor, Tensor]:
        """(threshold, F1 at it) per label: the candidate threshold with the highest F1 on the
        data seen since the last reset (ties: the middle of the tied run). A label without
        positives keeps 0.5."""
        precision, recall, candidates = self.curve.compute()
        precision, recall = precision[:, :-1], recall[:, :-1]  # the last point is (1, 0), no threshold
        # Above a label's highest score nothing is predicted: precision is 0/0, NaN in torchmetrics.
        f1 = torch.nan_to_num(2 * precision * recall / (precision + recall).clamp_min(1e-12), nan=0.0)
        best_f1 = f1.max(dim=1).values
        # The middle of the run of thresholds that reach the best F1, not its lowest end: on the
        # validation set they are all as good, and the middle leaves a margin both ways.
        best = f1 >= best_f1[:, None] - 1e-6
        first = best.int().argmax(dim=1)
        last = best.shape[1] - 1 - best.flip(1).int().argmax(dim=1)
        index = (first + last) // 2
        present = self.positives() > 0
        thresholds = torch.where(present, candidates[index], torch.full_like(candidates[index], 0.5))
        return thresholds, best_f1

    def positives(self) -> Tensor:
        """Images with each label, over everything seen (all ranks)."""
        return self.counts.compute()[:, 4]  # tp, fp, tn, fn, support

    def reset(self) -> None:
        for metric in (self.ap, self.ap_micro, self.f1, self.f1_micro, self.exact_match, self.counts, self.curve):
            if metric is not None:
                metric.reset()


def macro_mean(values: Tensor, present: Tensor) -> Tensor:
    """Mean over the labels with a positive image (0 when none has one)."""
    return values[present].mean() if bool(present.any()) else values.new_zeros(())
