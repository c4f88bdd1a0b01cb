"""Embedding heads: features -> embeddings, L2-normalised unless asked otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Linear projection to ``out_dim`` followed by L2 normalisation (``normalize=False``: none, the
    embeddings live in R^out_dim, as in the EPS paper's 2-d MNIST protocol).

    Kaiming-normal (fan_out) initialisation and zero bias, as in the Proxy-Anchor code.
    """

    def __init__(self, in_dim: int, out_dim: int = 512, normalize: bool = True):
        super().__init__()
        self.out_dim, self.normalize = out_dim, normalize
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim), with unit rows when ``normalize``."""
        out = self.linear(features)
        return F.normalize(out, dim=1) if self.normalize else out
