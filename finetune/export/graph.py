"""What an exported graph computes: optional uint8 RGB input, the network's own `predict`, its
outputs by the names the task's contract gives, in that order."""

from __future__ import annotations

import torch
from torch import nn

# Example input for export. Not the training size: torch.export specialises a size that makes an
# intermediate feature map 1x1 (0/1 specialisation), so 32 px would freeze the height at 32.
# 64x96 leaves every ResNet stage at least 2x3; height != width so neither is tied to the other.
EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 64, 96


class ExportGraph(nn.Module):
    """`normalize_in_graph`: the input is uint8 [N, H, W, 3] RGB, as images are decoded, and the
    training normalisation runs inside; else float32 [N, 3, H, W], already normalised."""

    def __init__(self, network: nn.Module, output_names, mean, std, normalize_in_graph: bool = True):
        super().__init__()
        self.network = network
        self.output_names = list(output_names)
        self.normalize_in_graph = normalize_in_graph
        # Same arithmetic as the training pipeline's A.Normalize: (x - 255 mean) / (255 std).
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image
        if self.normalize_in_graph:
            x = (image.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std
        outputs = self.network.predict(x)  # test-time flips/scales too, where the network has them
        return tuple(outputs[name] for name in self.output_names)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        # Batch 2: torch.export would specialise a batch of 1.
        if self.normalize_in_graph:
            return torch.randint(0, 256, (batch, EXAMPLE_HEIGHT, EXAMPLE_WIDTH, 3), dtype=torch.uint8)
        return torch.randn(batch, 3, EXAMPLE_HEIGHT, EXAMPLE_WIDTH)
