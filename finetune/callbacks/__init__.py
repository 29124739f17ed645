from finetune.callbacks.checkpoint import ModelCheckpoint
from finetune.callbacks.embedding import EmbeddingWriter, WandbEmbeddingLogger
from finetune.callbacks.media import WandbMediaLogger
from finetune.callbacks.predictions import PredictionCSVWriter
from finetune.callbacks.segmentation import SegmentationMaskWriter, WandbMaskLogger

__all__ = [
    "EmbeddingWriter",
    "ModelCheckpoint",
    "PredictionCSVWriter",
    "SegmentationMaskWriter",
    "WandbEmbeddingLogger",
    "WandbMaskLogger",
    "WandbMediaLogger",
]
