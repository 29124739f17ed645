"""The run's pictures and numbers as plain files, with or without a logger (issue 21)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn

from finetune.report.history import MetricHistory, scalar_metrics
from finetune.report.html import render_index
from finetune.report.task_figures import FigurePlan, MaskSample, mask_sample, plan_figures

log = logging.getLogger(__name__)

HISTORY_CSV = "metrics.csv"
INDEX_HTML = "index.html"

Section = str | Callable[[Path], str]


class RunReport(Callback):
    """At the end of `fit` (and of `validate`), on rank 0, writes `<trainer.default_root_dir>/<dirname>/`
    (`validate`: its `validate/` subfolder, so that the training report stays):

    - loss.png, metrics.png: train/val loss and the validation metrics per epoch;
    - the task's figures of the last validation: confusion_matrix.png (classification), iou.png and
      masks.png (segmentation, `num_images` overlays), roc.png and similarity.png (embeddings),
      per_label.png (multi-label);
    - metrics.csv: every validation's and training epoch's metrics;
    - index.html: all of them, the final metrics as a table, and the sections of `add_section`.

    It needs no logger: it reads `trainer.callback_metrics` after each validation and training
    epoch, and keeps that history in its checkpoint state, so a resumed run's curves continue.
    A figure that fails is left out with one log line; the report never stops a run.
    """

    def __init__(self, enabled: bool = True, dirname: str = "report", num_images: int = 8):
        self.enabled = enabled
        self.dirname = dirname
        self.num_images = num_images
        self.history = MetricHistory()
        self.sections: dict[str, Section] = {}
        self._masks: MaskSample | None = None
        self._train_epoch_to_record: tuple[int, int] | None = None  # (epoch, step)
        self._trainer = None

    def folder(self, trainer) -> Path:
        """Where this run's report goes."""
        folder = Path(trainer.default_root_dir) / self.dirname
        return folder / "validate" if trainer.state.fn == TrainerFn.VALIDATING else folder

    def add_section(self, title: str, html: Section) -> None:
        """A section of index.html after the figures; adding a title again replaces it. `html`: the
        section's HTML body, or a function of the report folder that returns it, called each time
        the report is written (it may write files into the folder and link them by name)."""
        self.sections[title] = html

    # -- collecting ---------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # for state_dict(), which Lightning calls without it

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._trainer = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (not self.enabled or self.num_images <= 0 or batch_idx != 0 or dataloader_idx != 0
                or trainer.sanity_checking or not trainer.is_global_zero):
            return
        if isinstance(batch, dict) and "mask" in batch and torch.is_tensor(outputs):
            self._safely("keeping validation masks", lambda: self._keep_masks(trainer, pl_module, batch, outputs))

    def _keep_masks(self, trainer, pl_module, batch, outputs) -> None:
        self._masks = mask_sample(batch, outputs, trainer.datamodule, pl_module, self.num_images)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:  # every rank: the history is checkpoint state
            self.history.add(trainer.current_epoch, trainer.global_step, scalar_metrics(trainer.callback_metrics, "val/"))
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning calls callbacks before the module's on_train_epoch_end, where the task logs its
        # epoch means: they are read at the next hook (or checkpoint) instead.
        self._train_epoch_to_record = (trainer.current_epoch, trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record_train_epoch(trainer)

    def _record_train_epoch(self, trainer) -> None:
        if self._train_epoch_to_record is None or not self.enabled:
            return
        (epoch, step), self._train_epoch_to_record = self._train_epoch_to_record, None
        self.history.add(epoch, step, scalar_metrics(trainer.callback_metrics, "train/"))

    def state_dict(self) -> dict:
        if self._trainer is not None:
            # A checkpoint saved at the end of a training epoch (after the task logged its
            # means) carries that epoch's row, so a run resumed from it has no gap.
            self._record_train_epoch(self._trainer)
        return {"history": self.history.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = MetricHistory(state_dict.get("history", []))

    # -- writing ------------------------------------------------------------------------------

    def on_fit_end(self, trainer, pl_module) -> None:
        self._record_train_epoch(trainer)  # the last epoch's
        if self.enabled and trainer.is_global_zero:
            from finetune.report.interpretation_section import TITLE, interpretation_section

            section = interpretation_section(trainer, pl_module)  # classification only
            if section is not None:
                self.add_section(TITLE, section)
        self._write(trainer, pl_module)

    def _write(self, trainer, pl_module) -> None:
        if self.enabled and trainer.is_global_zero:
            self._safely("writing the report", lambda: self.write(trainer, pl_module))

    def write(self, trainer, pl_module) -> Path:
        """Write the report now (into `folder(trainer)`); returns its index.html."""
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        metrics = scalar_metrics(trainer.callback_metrics, "")
        if self.history.rows:
            self.history.write_csv(folder / HISTORY_CSV)
        figures = [(plan.filename, plan.caption) for plan in self._plans(pl_module, metrics) if self._draw(plan, folder)]
        sections = [(title, self._section_html(title, body, folder)) for title, body in self.sections.items()]
        index = folder / INDEX_HTML
        title = f"Run report: {Path(trainer.default_root_dir).resolve().name} ({trainer.state.fn.value})"
        index.write_text(render_index(title, metrics, figures, sections, HISTORY_CSV if self.history.rows else None),
                         encoding="utf-8")
        log.info("report: %s", index)
        return index

    def _plans(self, pl_module, metrics: dict[str, float]) -> list[FigurePlan]:
        try:
            return plan_figures(self.history, pl_module, self._masks, metrics)
        except ImportError as err:  # matplotlib missing: the table and metrics.csv are still worth having
            log.warning("report: no figures (%s); `pip install matplotlib` to get them", err)
            return []

    @staticmethod
    def _draw(plan: FigurePlan, folder: Path) -> bool:
        path = folder / plan.filename
        path.unlink(missing_ok=True)  # a figure that fails now must not show an older run's
        try:
            plan.draw(path)
            return True
        except Exception as err:  # a figure never costs the run
            log.warning("report: %s not drawn (%s: %s)", plan.filename, type(err).__name__, err)
            return False

    @staticmethod
    def _section_html(title: str, body: Section, folder: Path) -> str:
        if isinstance(body, str):
            return body
        try:
            return body(folder)
        except Exception as err:
            log.warning("report: section %r not written (%s: %s)", title, type(err).__name__, err)
            return "<p>This section could not be written; see the run's log.</p>"

    @staticmethod
    def _safely(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as err:  # the report never stops a training run
            log.warning("report: %s failed (%s: %s); training goes on", what, type(err).__name__, err)


def run_report_of(trainer) -> RunReport | None:
    """The trainer's enabled RunReport, if any (where to add sections, where the pictures are)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, RunReport) and cb.enabled), None)
