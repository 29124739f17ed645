from finetune.callbacks.checkpoint import ModelCheckpoint
from finetune.callbacks.media import WandbMediaLogger
from finetune.callbacks.predictions import PredictionCSVWriter
from finetune.callbacks.segmentation import SegmentationMaskWriter, WandbMaskLogger

__all__ = ["ModelCheckpoint", "PredictionCSVWriter", "SegmentationMaskWriter", "WandbMaskLogger", "WandbMediaLogger"]
