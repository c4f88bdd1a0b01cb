"""Embedding heads: features -> L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Linear projection to ``out_dim`` followed by L2 normalisation.

    Kaiming-normal (fan_out) initialisation and zero bias, as in the Proxy-Anchor code.
    """

    def __init__(self, in_dim: int, out_dim: int = 512):
        super().__init__()
        self.out_dim = out_dim
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) with unit rows."""
        return F.normalize(self.linear(features), dim=1)
