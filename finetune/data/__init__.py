from finetune.data.classification import ImageFolderDataModule
from finetune.data.segmentation import SegmentationFolderDataModule

__all__ = ["ImageFolderDataModule", "SegmentationFolderDataModule"]
