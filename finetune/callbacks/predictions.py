"""`finetune predict`: the task's predictions as files, through the writer its contract names
(finetune.writers: a CSV of classes, mask PNGs, embeddings with a FAISS index)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.callbacks.segmentation import palette_for
from finetune.writers import WRITERS, PredictionFiles


class PredictionWriter(BasePredictionWriter):
    """Always on in the CLI (config section `predictions`).

    output_dir: where the files go; default: the run folder (`predictions.csv`), its
        `predictions/` (`masks/`, `overlays/`) or its `embeddings/`, by task. Under DDP each
        rank writes its own `predictions.rank<N>.csv`; embeddings are written by one process.
    top_k: classes listed per image in the CSV.
    """

    def __init__(self, output_dir: str | None = None, top_k: int = 5):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.top_k = top_k
        self._files: PredictionFiles | None = None

    def _open(self, trainer, pl_module) -> PredictionFiles:
        writer = WRITERS[pl_module.contract.writer]
        if writer.one_process and trainer.world_size > 1:
            raise RuntimeError(f"finetune predict for {pl_module.contract.name} runs on one device; set --trainer.devices 1")
        out = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / writer.folder
        palette = palette_for(trainer.datamodule, len(pl_module.class_names))
        rank = trainer.global_rank if trainer.world_size > 1 else None
        thresholds = getattr(pl_module, "decision_thresholds", None)  # multi-label tasks have them
        return writer(out, list(pl_module.class_names), palette, self.top_k, rank, thresholds)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._files is None:
            self._files = self._open(trainer, pl_module)
        outputs = {}
        for name in self._files.reads:
            tensor = prediction[name]
            outputs[name] = (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()
        self._files.write(list(prediction["path"]), outputs, prediction.get("size"))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._files is not None:
            print(self._files.close())
            self._files = None
