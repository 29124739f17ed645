from finetune.tasks.classification import ClassificationTask
from finetune.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask"]
