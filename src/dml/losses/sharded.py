"""Class proxies sharded across DDP ranks: each rank holds a contiguous slice of the bank, and every proxy
term is computed exactly, as one process with the whole bank computes it.

Partial FC's layout (insightface's ``arcface_torch``), without its sampling by default. Each rank sees the
global batch (:func:`~dml.losses.distributed.gather_batch`) and only its own proxies:

- a sum over proxies (Proxy-Anchor) is summed over ranks, with the global normalisers (positive proxies
  in the batch, read from the gathered labels; the number of classes);
- a softmax over proxies (ProxyNCA) takes its maximum and its normaliser over ranks, and each item's
  positive logit from the rank that owns its class;
- a coding rate of proxies (AntiCo) is ``1/2 logdet(I + c P^T P)`` with the d x d Gram matrix summed over
  ranks: the cost and the traffic stay d x d whatever the number of classes.

Gradients: a sum over ranks passes its gradient back unchanged to each rank's own part (every rank computes
the same global value, and each differentiates only what it holds); the gathered embeddings, which every
rank's shard reaches, have their gradients summed over ranks (:func:`gradients_summed`), so that each
rank's own items receive the whole gradient; the proxies' gradients stay on their rank.

The same functions compute the terms over the proxies a step samples (:mod:`dml.losses.proxy_sampling`),
sharded or not: each sees :class:`Proxies`, rows with their classes and the weights they count with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import Function

from dml.functional import (
    Scale,
    cosine_similarity,
    half_logdet_plus_identity,
    masked_logsumexp_plus_one,
    once_each,
    rate_constant,
)

if TYPE_CHECKING:
    from dml.losses.proxy import ProxyBank


class Proxies(NamedTuple):
    """The proxies a term sees on this rank (:meth:`~dml.losses.proxy.ProxyBank.seen`): ``weight`` rows
    (not normalised) of global ``classes``; ``weights`` they count with (None: 1 each); ``n``, the
    number of proxies over all ranks; ``across``: whether the other ranks hold the others (a sharded bank),
    so that sums go over ranks."""

    weight: torch.Tensor
    classes: torch.Tensor
    weights: torch.Tensor | None
    n: torch.Tensor | int
    across: bool


def shard_bounds(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """The classes [lo, hi) rank ``rank`` of ``world`` holds: contiguous, the first ``num_classes % world``
    ranks one more."""
    base, extra = divmod(num_classes, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


class _SumOverRanks(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad  # every rank differentiates the same global value: each its own part


class _GradientsSummed(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(x: torch.Tensor, across: bool = True) -> torch.Tensor:
    """The sum of ``x`` over ranks, on every rank; its gradient reaches each rank's own ``x`` unchanged.
    ``across=False``: ``x`` (every rank holds the whole)."""
    return _SumOverRanks.apply(x) if across else x


def gradients_summed(x: torch.Tensor, across: bool = True) -> torch.Tensor:
    """``x`` as it is; in the backward pass its gradient is summed over ranks (gathered embeddings that
    every rank's proxies reach). ``across=False``: nothing to sum."""
    return _GradientsSummed.apply(x) if across else x


def _widened(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it half or bfloat16 (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _max_over_ranks(x: torch.Tensor, across: bool) -> torch.Tensor:
    out = x.detach().clone()
    if across:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def _weighted(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return x if weights is None else x * weights.to(x.dtype)


def proxy_anchor(
    embeddings: torch.Tensor, labels: torch.Tensor, seen: Proxies, alpha: float, delta: float
) -> torch.Tensor:
    """Proxy-Anchor over the global batch and the proxies ``seen`` (this rank's), its means over all the
    ranks' proxies."""
    embeddings = gradients_summed(_widened(embeddings), seen.across)  # summed in float32 at least
    cos = cosine_similarity(embeddings, seen.weight)  # (B, m)
    pos = labels[:, None] == seen.classes
    pos_term = masked_logsumexp_plus_one(-alpha * (cos - delta), pos, dim=0)
    neg_term = masked_logsumexp_plus_one(alpha * (cos + delta), ~pos, dim=0)
    with_positive = once_each(labels).sum().round()  # the classes in the batch: proxies with a positive
    positive = _weighted(torch.where(pos.any(dim=0), pos_term, torch.zeros_like(pos_term)), seen.weights)
    negative = _weighted(neg_term, seen.weights)
    return sum_over_ranks(positive.sum() / with_positive + negative.sum() / seen.n, seen.across)


def proxy_nca(
    embeddings: torch.Tensor, labels: torch.Tensor, seen: Proxies, scale: float, exclude_positive: bool
) -> torch.Tensor:
    """ProxyNCA over the global batch and the proxies ``seen``, the softmax's maximum and normaliser
    taken over ranks."""
    embeddings = gradients_summed(_widened(embeddings), seen.across)
    logits = -scale * (2 - 2 * cosine_similarity(embeddings, seen.weight))  # -scale * ||x - p||^2, (B, m)
    pos = labels[:, None] == seen.classes  # the item's class: one column, or its rows weighing 1 in all
    positive = _weighted(torch.where(pos, logits, torch.zeros_like(logits)), seen.weights).sum(dim=1)
    positive = sum_over_ranks(positive, seen.across)
    if exclude_positive:
        logits = logits.masked_fill(pos, float("-inf"))
    top = _max_over_ranks(logits.max(dim=1).values, seen.across)
    normaliser = _weighted(torch.exp(logits - top[:, None]), seen.weights).sum(dim=1)
    return (torch.log(sum_over_ranks(normaliser, seen.across)) + top - positive).mean()


def proxy_coding_rate(seen: Proxies, eps: float, scale: Scale) -> torch.Tensor:
    """The coding rate of the (normalised) proxies ``seen`` on all the ranks, from the d x d Gram matrix
    summed over ranks."""
    z = F.normalize(seen.weight, dim=1)
    return _rate_of_gram(z, seen.weights, seen.n, eps, scale, seen.across)


def batch_proxy_coding_rate(bank: ProxyBank, labels: torch.Tensor, eps: float, scale: Scale) -> torch.Tensor:
    """The coding rate of the proxies of the (global) batch's classes, each once: every rank adds the
    rows it holds, weighted 1 / count (:func:`~dml.functional.once_each`), to the d x d Gram matrix."""
    local = labels - bank.offset
    owned = (local >= 0) & (local < len(bank.weight))
    rows = bank.normalized(local.clamp(0, len(bank.weight) - 1))
    weights = once_each(labels)
    return _rate_of_gram(rows, weights * owned, weights.sum(), eps, scale, across=True)


def _rate_of_gram(
    z: torch.Tensor,
    weights: torch.Tensor | None,
    n: torch.Tensor | float,
    eps: float,
    scale: Scale,
    across: bool,
) -> torch.Tensor:
    d = z.shape[1]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        if weights is not None:
            z = z * weights.to(dtype).sqrt()[:, None]
        n = n.to(dtype) if isinstance(n, torch.Tensor) else n  # a number stays one: no copy to the device
        gram = sum_over_ranks(z.T @ z, across)
        c = rate_constant(n, d, eps, scale)
        return half_logdet_plus_identity(gram, c)
