from finetune.callbacks.checkpoint import ModelCheckpoint
from finetune.callbacks.media import WandbMediaLogger
from finetune.callbacks.predictions import PredictionCSVWriter

__all__ = ["ModelCheckpoint", "PredictionCSVWriter", "WandbMediaLogger"]
