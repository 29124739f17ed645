"""Learn from a run: what a classifier gets most wrong, which classes it confuses, and which
labels are likely wrong (fastai's ClassificationInterpretation; confident learning, Northcutt
et al. 2021, as cleanlab's `find_label_issues`). Pure computation on per-sample probabilities:
no Lightning, no network; finetune/interpret_command.py makes the probabilities."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

# The loss of a probability that rounded to 0: Classifier.logits_of clamps the same way.
_SMALLEST_PROBABILITY = 1e-12
# cleanlab compares probabilities with thresholds less 1e-6: a class mean that float rounding
# puts a hair above every one of its samples still counts them.
_THRESHOLD_SLACK = 1e-6


class Row(NamedTuple):
    """One sample: its labelled (`true`) and `predicted` class names, their probabilities, and
    the cross-entropy of the labelled class (`loss`)."""

    path: str
    true: str
    predicted: str
    p_predicted: float
    p_true: float
    loss: float


@dataclass
class Interpretation:
    """`probabilities` [N, C] (softmax outputs), `labels` [N] class indices, `paths` N item ids,
    `class_names` C names."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        self.probabilities = torch.as_tensor(self.probabilities).detach().float().cpu()
        self.labels = torch.as_tensor(self.labels).detach().long().cpu()
        self.paths = [str(path) for path in self.paths]
        n, classes = self.probabilities.shape if self.probabilities.dim() == 2 else (-1, -1)
        if n < 0 or self.labels.shape != (n,) or len(self.paths) != n or len(self.class_names) != classes:
            raise ValueError(
                f"interpretation: probabilities {tuple(self.probabilities.shape)}, labels {tuple(self.labels.shape)}, "
                f"{len(self.paths)} paths, {len(self.class_names)} class names; expected [N, C], [N], N and C"
            )
        if n and not (0 <= int(self.labels.min()) and int(self.labels.max()) < classes):
            raise ValueError(f"interpretation: labels must be class indices in 0..{classes - 1} (single-label)")

    # -- per sample ---------------------------------------------------------------------------

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    @property
    def p_true(self) -> torch.Tensor:
        return self.probabilities.gather(1, self.labels[:, None]).squeeze(1)

    @property
    def losses(self) -> torch.Tensor:
        """Cross-entropy of the labelled class, -log p_true."""
        return -self.p_true.clamp_min(_SMALLEST_PROBABILITY).log()

    def row(self, index: int) -> Row:
        predicted, label = int(self.predicted[index]), int(self.labels[index])
        return Row(
            self.paths[index], self.class_names[label], self.class_names[predicted],
            float(self.probabilities[index, predicted]), float(self.p_true[index]), float(self.losses[index]),
        )

    def by_loss(self) -> list[int]:
        """Sample indices, highest loss first (ties in sample order)."""
        return torch.argsort(self.losses, descending=True, stable=True).tolist()

    # -- fastai's ClassificationInterpretation --------------------------------------------------

    def top_losses(self, k: int | None = None) -> list[Row]:
        """The `k` samples with the highest loss (all with None), highest first."""
        return [self.row(i) for i in self.by_loss()[:k]]

    def confusion_matrix(self) -> torch.Tensor:
        """[C, C] counts: row the labelled class, column the predicted one."""
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        return multiclass_confusion_matrix(self.predicted, self.labels, len(self.class_names))

    def most_confused(self, min_count: int = 1) -> list[tuple[str, str, int]]:
        """(true, predicted, count) off the diagonal with count >= min_count, most first (fastai's)."""
        matrix = self.confusion_matrix().tolist()
        names = self.class_names
        pairs = [
            (names[i], names[j], count)
            for i, counts in enumerate(matrix) for j, count in enumerate(counts)
            if i != j and count >= min_count
        ]
        return sorted(pairs, key=lambda pair: pair[2], reverse=True)  # stable: ties in class order

    # -- confident learning ---------------------------------------------------------------------

    def thresholds(self) -> torch.Tensor:
        """[C]: t_j, the mean probability of class j over the samples labelled j (inf for a class
        no sample is labelled with: nothing counts as confidently it)."""
        classes = len(self.class_names)
        counts = torch.bincount(self.labels, minlength=classes).float()
        sums = torch.zeros(classes).index_add_(0, self.labels, self.p_true)
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.inf))

    def confident_class(self) -> torch.Tensor:
        """[N]: the class each sample confidently belongs to, -1 where no class j reaches its
        threshold t_j: among the classes that do, the most probable (cleanlab's confident joint)."""
        above = self.probabilities >= self.thresholds() - _THRESHOLD_SLACK
        best = self.probabilities.masked_fill(~above, -1.0).argmax(dim=1)
        return torch.where(above.any(dim=1), best, torch.full_like(best, -1))

    def mislabelled_mask(self) -> torch.Tensor:
        """[N] bool: samples in an off-diagonal cell of the confident joint."""
        confident = self.confident_class()
        return (confident >= 0) & (confident != self.labels)

    def likely_mislabelled(self) -> list[Row]:
        """Samples whose label confident learning doubts, most doubtful first.

        The variant is cleanlab's `filter_by="confident_learning"`: every off-diagonal sample
        of the confident joint, not `prune_by_noise_rate` (the default), which calibrates the
        joint and keeps only the estimated number of label errors per cell. That estimate needs
        many samples per class pair to be stable; a run's validation split often has a handful,
        and here the list is a reading list for a person, so it errs on the side of showing more.

        Ranked by margin, p of the most probable other class minus p of the labelled class
        (cleanlab's normalized margin, negated): p_predicted - p_true when the prediction is wrong.
        """
        flagged = self.mislabelled_mask().nonzero().squeeze(1)
        others = self.probabilities.scatter(1, self.labels[:, None], -math.inf)
        margin = others.max(dim=1).values - self.p_true
        order = torch.argsort(margin[flagged], descending=True, stable=True)
        return [self.row(int(i)) for i in flagged[order]]

    # -- files -----------------------------------------------------------------------------

    def write_csv(self, path: str | Path) -> Path:
        """Every sample, highest loss first: path,true,predicted,p_predicted,p_true,loss,likely_mislabelled."""
        path = Path(path)
        flagged = self.mislabelled_mask().tolist()
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([*Row._fields, "likely_mislabelled"])
            for i in self.by_loss():
                row = self.row(i)
                writer.writerow([row.path, row.true, row.predicted, f"{row.p_predicted:.6f}", f"{row.p_true:.6f}",
                                 f"{row.loss:.6f}", "true" if flagged[i] else "false"])
        return path

    def write_confused_csv(self, path: str | Path) -> Path:
        """Every confused pair, most first: true,predicted,count."""
        path = Path(path)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["true", "predicted", "count"])
            writer.writerows(self.most_confused())
        return path

    def top_losses_figure(self, path: str | Path, k: int = 9, images: Callable[[str], object] | None = None) -> Path:
        """fastai's plot_top_losses: a grid of the `k` highest-loss images, each captioned
        true/predicted/p(predicted)/loss. `images`: path -> image (array or PIL); default: read
        the file with PIL. An image that cannot be read gets an empty panel, not an error."""
        from finetune.report.drawing import new_figure, save

        rows = self.top_losses(k)
        path = Path(path)
        columns = max(1, math.ceil(math.sqrt(len(rows))))
        lines = max(1, math.ceil(len(rows) / columns))
        figure = new_figure(2.6 * columns, 2.8 * lines + 0.4)
        figure.suptitle("true / predicted / p(predicted) / loss", fontsize=10)
        read = images or _thumbnail
        for n, row in enumerate(rows):
            axes = figure.add_subplot(lines, columns, n + 1)
            axes.set_axis_off()
            try:
                axes.imshow(read(row.path))
            except (OSError, ValueError):
                axes.text(0.5, 0.5, "unreadable", ha="center", va="center")
            axes.set_title(f"{row.true}/{row.predicted}/{row.p_predicted:.2f}/{row.loss:.2f}", fontsize=8)
        save(figure, path)
        return path


def _thumbnail(path: str, side: int = 256):
    """The image as RGB, at most `side` px: a grid panel needs no more, and a photo's full size
    times nine would take hundreds of MB."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        return np.asarray(image)
