from finetune.callbacks.media import WandbMediaLogger
from finetune.callbacks.predictions import PredictionCSVWriter

__all__ = ["PredictionCSVWriter", "WandbMediaLogger"]
