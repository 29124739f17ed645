from finetune.tasks.classification import ClassificationTask
from finetune.tasks.embedding import EmbeddingTask
from finetune.tasks.multilabel import MultiLabelClassificationTask
from finetune.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "EmbeddingTask", "MultiLabelClassificationTask", "SegmentationTask"]
