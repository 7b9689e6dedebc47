"""The architecture this template adapts: a plain-torch MLP classifier.

In a real plugin the model comes from another library (that is what you are adapting); it lives
here only so the template is self-contained.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPClassifier(nn.Module):
    """``x [batch, in_features]`` -> linear embedding -> ``depth`` blocks of (linear, ReLU) -> class logits."""

    def __init__(self, in_features: int = 8, width: int = 16, depth: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)
