from finetune.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
