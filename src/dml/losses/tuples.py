"""Index tuples over a batch: positive/negative pairs and (anchor, positive, negative) triplets.

Pairs are (a1, p, a2, n): a1[i]-p[i] are positive pairs and a2[j]-n[j] negative pairs. Triplets are
(a, p, n). Miners return one of the two; losses accept either, as in pytorch-metric-learning.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Triplets materialised at once when enumerating all of them: bounds memory at any batch size.
MAX_TRIPLETS_PER_CHUNK = 1 << 22


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) masks of positive pairs (same label, self excluded) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return positive, ~same


def all_pairs(labels: torch.Tensor) -> Pairs:
    positive, negative = label_masks(labels)
    a1, p = torch.nonzero(positive, as_tuple=True)
    a2, n = torch.nonzero(negative, as_tuple=True)
    return a1, p, a2, n


def to_pairs(indices: Pairs | Triplets | None, labels: torch.Tensor) -> Pairs:
    """Pairs from a miner's output (pairs as they are, triplets split), or all pairs when ``None``."""
    if indices is None:
        return all_pairs(labels)
    if len(indices) == 4:
        return indices
    a, p, n = indices
    return a, p, a, n


def iter_triplets(indices: Pairs | Triplets | None, labels: torch.Tensor) -> Iterator[Triplets]:
    """Triplets in chunks of at most ``MAX_TRIPLETS_PER_CHUNK``, never a B x B x B tensor.

    ``None`` enumerates every valid triplet; pairs are joined on their anchor (each positive pair with
    every negative pair of the same anchor); triplets pass through.
    """
    if indices is not None and len(indices) == 3:
        yield indices
        return
    a1, p, a2, n = to_pairs(indices, labels)
    if len(a1) == 0 or len(a2) == 0:
        return
    batch = len(labels)
    # Negatives grouped by anchor: order the negative pairs by anchor, then slice per positive pair.
    order = torch.argsort(a2, stable=True)
    neg_sorted = n[order]
    neg_count = torch.bincount(a2, minlength=batch)
    neg_start = torch.cumsum(neg_count, 0) - neg_count
    per_pair = neg_count[a1]
    ends = torch.cumsum(per_pair, 0)
    start = 0
    while start < len(a1):
        limit = (ends[start - 1] if start else 0) + MAX_TRIPLETS_PER_CHUNK
        stop = max(start + 1, int(torch.searchsorted(ends, limit, right=True)))
        counts = per_pair[start:stop]
        a = a1[start:stop].repeat_interleave(counts)
        pp = p[start:stop].repeat_interleave(counts)
        first = neg_start[a1[start:stop]].repeat_interleave(counts)
        offset = torch.arange(len(a), device=labels.device) - (
            torch.cumsum(counts, 0) - counts
        ).repeat_interleave(counts)
        yield a, pp, neg_sorted[first + offset]
        start = stop


def mean_of_nonzero(values: torch.Tensor) -> torch.Tensor:
    """Mean over the strictly positive entries; 0 (with gradient) when there are none."""
    nonzero = (values > 0).sum()
    return values.sum() / nonzero.clamp_min(1)
