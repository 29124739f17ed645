"""Image classifiers: timm backbone (its classifier removed) + pooled linear head; one class per
image (softmax) or any number of labels (a sigmoid each)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from finetune.backbones import Pretrained, create_backbone
from finetune.heads.classification import ClassificationHead
from finetune.models.tta import average_over_views


class Classifier(nn.Module):
    """`tta_flip` / `tta_scales`: test-time mirror and scales that `probabilities` averages over
    (validation, test, predict and the exported graph; training never uses them)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: Pretrained = False,
        weights: str | None = None,
        pool: str = "avg",
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.head = ClassificationHead(self.backbone.num_features, num_classes, pool, hidden_dim, dropout)
        self.tta_flip = tta_flip
        self.tta_scales = list(tta_scales or [1.0])

    @classmethod
    def from_hparams(cls, hp) -> Classifier:
        return cls(
            hp["backbone"], hp["num_classes"], hp["pretrained"], hp["weights"], hp["pool"], hp["hidden_dim"], hp["dropout"],
            hp.get("tta_flip", False), hp.get("tta_scales"),  # absent from checkpoints before test-time augmentation
        )

    @property
    def uses_tta(self) -> bool:
        return self.tta_flip or self.tta_scales != [1.0]

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    @staticmethod
    def activation(logits: Tensor) -> Tensor:
        return logits.softmax(dim=1)

    @staticmethod
    def logits_of(probabilities: Tensor) -> Tensor:
        """Logits whose `activation` gives `probabilities` back (the log: softmax undoes it)."""
        return probabilities.clamp_min(1e-12).log()

    def probabilities(self, images: Tensor) -> Tensor:
        """The activation of the logits, averaged over the test-time views (just the image without TTA)."""
        return average_over_views(lambda view: self.activation(self(view)), images, self.tta_flip, self.tta_scales, dense=False)

    def evaluation_logits(self, images: Tensor) -> Tensor:
        """What validation and test score: the logits, or with test-time augmentation the logits
        of the averaged probabilities (the loss of those is the averaged prediction's loss)."""
        if not self.uses_tta:
            return self(images)
        return self.logits_of(self.probabilities(images))

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        logits = self.evaluation_logits(images)
        return {"logits": logits, "probabilities": self.activation(logits)}


class MultiLabelClassifier(Classifier):
    """Any number of labels per image: an independent sigmoid per label (`probabilities` do not
    sum to 1). The network is Classifier's; only how logits become probabilities differs."""

    @staticmethod
    def activation(logits: Tensor) -> Tensor:
        return logits.sigmoid()

    @staticmethod
    def logits_of(probabilities: Tensor) -> Tensor:
        return torch.logit(probabilities, eps=1e-6)
