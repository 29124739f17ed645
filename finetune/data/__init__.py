from finetune.data.classification import ImageFolderDataModule

__all__ = ["ImageFolderDataModule"]
