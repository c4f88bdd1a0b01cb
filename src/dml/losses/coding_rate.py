"""Coding rate (MCR^2) and the Anti-Collapse (AntiCo) loss built on it."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dml.losses.proxy import ProxyBank

Scale = Literal["official", "mcr2"]


def coding_rate(z: torch.Tensor, eps: float = 0.5, scale: Scale = "mcr2") -> torch.Tensor:
    """Coding rate R(Z) = 1/2 logdet(I + c Z^T Z) of the rows of ``z``.

    Args:
        z: embeddings, shape (n, d).
        eps: MCR^2's distortion (its "eps squared").
        scale: ``mcr2`` gives c = d / (n eps); ``official`` gives the AntiCo code's c = n / (d eps).

    Returns:
        A scalar in float32 (float64 when ``z`` is float64) whatever the autocast dtype. By Sylvester's
        identity the determinant is taken on the smaller of the n x n and d x d Gram matrices. The matrix
        I + cG has all eigenvalues >= 1, so its Cholesky factor exists and the value and gradient stay
        finite on collapsed (rank-deficient) input.
    """
    if z.ndim != 2:
        raise ValueError(f"coding_rate expects a 2-D (n, d) tensor, got shape {tuple(z.shape)}")
    n, d = z.shape
    if n == 0:
        raise ValueError("coding_rate got an empty set of vectors (n = 0)")
    if scale not in ("mcr2", "official"):
        raise ValueError(f"scale must be 'mcr2' or 'official', got {scale!r}")
    c = d / (n * eps) if scale == "mcr2" else n / (d * eps)
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        gram = z @ z.T if n <= d else z.T @ z
        eye = torch.eye(gram.shape[0], dtype=dtype, device=z.device)
        chol = torch.linalg.cholesky(eye + c * gram)
        return torch.log(torch.diagonal(chol)).sum()  # 1/2 * logdet = sum log diag(L)


class AntiCoLoss(nn.Module):
    """Anti-Collapse loss: rewards a high coding rate of the batch embeddings or of the class proxies.

    Variants (DESIGN §2): ``pair`` takes the batch embeddings; ``batch_proxy`` the L2-normalised proxies of
    the classes present in the batch (the official default); ``all_proxy`` all proxies. The proxy variants
    touch only the proxies. ``form='exp'`` returns exp(-gamma R) as the official code does; ``form='neg'``
    returns -gamma R. ``scale=None`` picks each variant's standard: MCR^2's d/(n eps) for ``pair``, the
    official n/(d eps) for the proxy variants.
    """

    variants = ("pair", "batch_proxy", "all_proxy")

    def __init__(
        self,
        variant: Literal["pair", "batch_proxy", "all_proxy"] = "batch_proxy",
        eps: float = 0.5,
        gamma: float = 1.0,
        scale: Scale | None = None,
        form: Literal["exp", "neg"] = "exp",
        proxies: ProxyBank | None = None,
        num_classes: int | None = None,
        embedding_size: int | None = None,
    ):
        super().__init__()
        if variant not in self.variants:
            raise ValueError(f"AntiCo variant must be one of {self.variants}, got {variant!r}")
        if form not in ("exp", "neg"):
            raise ValueError(f"AntiCo form must be 'exp' or 'neg', got {form!r}")
        if scale not in (None, "official", "mcr2"):
            raise ValueError(f"AntiCo scale must be 'official', 'mcr2' or null, got {scale!r}")
        self.variant, self.eps, self.gamma, self.form = variant, eps, gamma, form
        self.scale: Scale = scale or ("mcr2" if variant == "pair" else "official")
        owner = f"AntiCo variant {variant!r}"
        self.proxies = (
            None if variant == "pair" else ProxyBank.resolve(proxies, num_classes, embedding_size, owner)
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: embeddings (B, d); labels (B,) class indices (unused by ``pair``). Returns a scalar."""
        if self.variant == "pair":
            z = embeddings
        elif self.variant == "batch_proxy":
            z = self.proxies.normalized(torch.unique(labels))
        else:
            z = self.proxies.normalized()
        rate = coding_rate(z, eps=self.eps, scale=self.scale)
        return torch.exp(-self.gamma * rate) if self.form == "exp" else -self.gamma * rate
