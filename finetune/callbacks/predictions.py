"""Write `finetune predict` results to a CSV: path, predicted class, probability, top-k."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.callbacks.outputs import csv_header, csv_rows


class PredictionCSVWriter(BasePredictionWriter):
    """Rows are written batch by batch, so a long prediction run keeps what it has done.

    `path` defaults to `<default_root_dir>/predictions.csv`; under DDP each rank writes its
    own `predictions.rank<N>.csv`.
    """

    def __init__(self, path: str | None = None, top_k: int = 5):
        super().__init__(write_interval="batch")
        self.path = path
        self.top_k = top_k
        self._file = None
        self._writer = None

    def output_path(self, trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.csv")
        return path

    def _open(self, trainer) -> None:
        path = self.output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(csv_header(self.top_k))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if "probs" not in prediction:  # not a classifier (segmentation writes masks instead)
            return
        if self._file is None:  # opened on the first batch, so other tasks leave no empty CSV
            self._open(trainer)
        probs = prediction["probs"].float().cpu().numpy()
        self._writer.writerows(csv_rows(prediction["path"], probs, pl_module.class_names, self.top_k))
        self._file.flush()

    def on_predict_end(self, trainer, pl_module):
        if self._file is not None:
            self._file.close()
            print(f"predictions written to {self.output_path(trainer)}")
            self._file = None
