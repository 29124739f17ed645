"""Identity embedding network: backbone -> neck -> L2-normalised embedding.

The margin head (ArcFace, CosFace) is not part of it: it scores the training identities only,
so it lives in the task that trains with it (finetune.tasks.embedding)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from finetune.backbones import Pretrained, create_backbone
from finetune.heads.embedding import EmbeddingNeck


class EmbeddingNet(nn.Module):
    def __init__(
        self,
        backbone: str,
        pretrained: Pretrained = False,
        weights: str | None = None,
        embedding_dim: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.neck = EmbeddingNeck(self.backbone.num_features, embedding_dim, dropout)

    @classmethod
    def from_hparams(cls, hp) -> EmbeddingNet:
        return cls(hp["backbone"], hp["pretrained"], hp["weights"], hp["embedding_dim"], hp["dropout"])

    def embed_unnormalised(self, images: Tensor) -> Tensor:
        """What the margin head trains on: its logits normalise the embeddings themselves."""
        return self.neck(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """Unit-norm embeddings: cosine similarity is a dot product."""
        return F.normalize(self.embed_unnormalised(images).float(), dim=1)

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        return {"embedding": self(images)}
