"""Tensor maths shared by the losses and the evaluation: similarities and distances of unit vectors, a
masked log-sum-exp, and the coding rate. Neither package imports the other for these."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A context in which autocast is off, for similarity maths that bf16 would spoil."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities between the rows of ``x`` and ``y`` (default ``x``), in float32 or float64."""
    with full_precision(x):
        x = F.normalize(upcast(x), dim=1)
        y = x if y is None else F.normalize(upcast(y), dim=1)
        return x @ y.T


def squared_distance(x: torch.Tensor, y: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x`` and ``y`` (default ``x``), never below 0.

    ``normalize``: of the L2-normalised rows (2 - 2 cos); otherwise of the rows as they are, in the
    plane or space they live in (|x|^2 + |y|^2 - 2 x.y).
    """
    if normalize:
        return (2 - 2 * cosine_similarity(x, y)).clamp_min(0)
    with full_precision(x):
        x = upcast(x)
        y = x if y is None else upcast(y)
        return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Euclidean distances (see :func:`squared_distance`); finite gradient at 0."""
    return squared_distance(x, y, normalize).clamp_min(1e-12).sqrt()


def masked_logsumexp_plus_one(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + sum over ``mask`` of exp(logits)) along ``dim``, stable in low precision.

    The "1 +" is a zero logit appended to the reduction; masked-out entries contribute nothing.
    """
    neg_inf = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~mask, neg_inf)
    zero = torch.zeros_like(masked.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([masked, zero], dim=dim), dim=dim)


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
    c = rate_constant(n, d, eps, scale)
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        gram = z @ z.T if n <= d else z.T @ z
        return half_logdet_plus_identity(gram, c)


def weighted_coding_rate(
    z: torch.Tensor, weights: torch.Tensor, eps: float = 0.5, scale: Scale = "mcr2"
) -> torch.Tensor:
    """The coding rate of a set given as the rows of ``z`` (m, d) with ``weights`` (m,): each row counts
    ``weight`` times, and n is the weights' sum, read on the device. A row repeated k times with weight 1/k
    counts once (the proxies of a batch's labels, each class once, without ``unique``, which would make the
    host wait); a weight of 0 leaves a row out. The Gram matrix is sum_i w_i z_i z_i^T (by Sylvester's
    identity the smaller of the m x m and d x d forms is factored)."""
    if z.ndim != 2 or weights.shape != z.shape[:1]:
        raise ValueError(
            f"weighted_coding_rate expects (m, d) rows and (m,) weights, got {tuple(z.shape)}, {tuple(weights.shape)}"
        )
    d = z.shape[1]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        weights = weights.to(dtype)
        z = z.to(dtype) * weights.sqrt()[:, None]
        c = rate_constant(weights.sum(), d, eps, scale)
        gram = z @ z.T if z.shape[0] <= d else z.T @ z
        return half_logdet_plus_identity(gram, c)


def once_each(labels: torch.Tensor) -> torch.Tensor:
    """(B,) weights 1 / (how many items of the batch share the item's label): summed over a class, 1."""
    return 1 / (labels[:, None] == labels[None, :]).sum(dim=1)


def rate_constant(n: Any, d: int, eps: float, scale: Scale) -> Any:
    """c of the coding rate of n vectors of d dimensions (``n`` a number or a tensor): d / (n eps) for
    ``mcr2``, n / (d eps) for ``official``.

    Raises:
        ValueError: another scale.
    """
    if scale not in ("mcr2", "official"):
        raise ValueError(f"scale must be 'mcr2' or 'official', got {scale!r}")
    return d / (n * eps) if scale == "mcr2" else n / (d * eps)


def half_logdet_plus_identity(gram: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """1/2 logdet(I + c gram) = sum log diag(L), L the Cholesky factor; ``cholesky_ex``: no error check,
    which would read the factorisation's status on the host (I + c gram is positive definite)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky_ex(eye + c * gram).L
    return torch.log(torch.diagonal(chol)).sum()
