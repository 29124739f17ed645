from finetune.data.classification import ImageFolderDataModule
from finetune.data.identity import IdentityFolderDataModule
from finetune.data.segmentation import SegmentationFolderDataModule

__all__ = ["IdentityFolderDataModule", "ImageFolderDataModule", "SegmentationFolderDataModule"]
