"""The networks the tasks train, as plain `nn.Module`s: no Lightning, no loss, no metrics.

Each has `predict(images) -> {output name: tensor}` (what `finetune predict` and an exported
graph return) and `from_hparams(hparams)`, which builds it from a task's hyperparameters: the
task builds it so, and export rebuilds it so from a checkpoint, without Lightning.
"""

from finetune.models.classifier import Classifier, MultiLabelClassifier
from finetune.models.deeplab import DeepLabV3
from finetune.models.embedding import EmbeddingNet

__all__ = ["Classifier", "DeepLabV3", "EmbeddingNet", "MultiLabelClassifier"]
