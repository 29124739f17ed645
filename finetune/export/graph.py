"""What an exported graph computes: optional uint8 RGB input, the task's own predict path, named
outputs (metadata.OUTPUTS)."""

from __future__ import annotations

import torch
from torch import nn

from finetune.export.metadata import OUTPUTS
from finetune.tasks.base import FinetuneTask

# Example input for export. Not the training size: torch.export specialises a size that makes an
# intermediate feature map 1x1 (0/1 specialisation), so 32 px would freeze the height at 32.
# 64x96 leaves every ResNet stage at least 2x3; height != width so neither is tied to the other.
EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 64, 96


class ExportGraph(nn.Module):
    """`normalize_in_graph`: the input is uint8 [N, H, W, 3] RGB, as images are decoded, and the
    training normalisation runs inside; else float32 [N, 3, H, W], already normalised."""

    def __init__(self, task: FinetuneTask, kind: str, mean, std, normalize_in_graph: bool = True):
        super().__init__()
        self.task = task
        self.kind = kind
        self.normalize_in_graph = normalize_in_graph
        # Same arithmetic as the training pipeline's A.Normalize: (x - 255 mean) / (255 std).
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUTS[self.kind])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image
        if self.normalize_in_graph:
            x = (image.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std
        if self.kind == "classification":
            logits = self.task(x)
            return logits, logits.softmax(dim=1)
        if self.kind == "segmentation":
            probs = self.task.evaluate(x)  # the task's predict path: test-time flips/scales if configured
            return probs.argmax(dim=1), probs
        return (self.task(x),)  # embedding: already L2-normalised by the task

    def example_input(self, batch: int = 2) -> torch.Tensor:
        # Batch 2: torch.export would specialise a batch of 1.
        if self.normalize_in_graph:
            return torch.randint(0, 256, (batch, EXAMPLE_HEIGHT, EXAMPLE_WIDTH, 3), dtype=torch.uint8)
        return torch.randn(batch, 3, EXAMPLE_HEIGHT, EXAMPLE_WIDTH)
