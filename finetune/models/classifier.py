"""Image classifier: timm backbone (its classifier removed) + pooled linear head."""

from __future__ import annotations

from torch import Tensor, nn

from finetune.backbones import Pretrained, create_backbone
from finetune.heads.classification import ClassificationHead


class Classifier(nn.Module):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: Pretrained = False,
        weights: str | None = None,
        pool: str = "avg",
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.head = ClassificationHead(self.backbone.num_features, num_classes, pool, hidden_dim, dropout)

    @classmethod
    def from_hparams(cls, hp) -> Classifier:
        return cls(hp["backbone"], hp["num_classes"], hp["pretrained"], hp["weights"], hp["pool"], hp["hidden_dim"], hp["dropout"])

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        logits = self(images)
        return {"logits": logits, "probabilities": logits.softmax(dim=1)}
