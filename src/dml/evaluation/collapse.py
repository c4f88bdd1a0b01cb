"""Measures of embedding-space collapse: how much of the space the embeddings of a split occupy."""

from __future__ import annotations

import torch

from dml.functional import coding_rate

# Class centroids compared in blocks of this many rows: SOP's 11k centroids never form a full matrix.
_BLOCK = 2048


def singular_values(embeddings: torch.Tensor) -> torch.Tensor:
    """Singular values of the (n, d) embedding matrix, descending, in float64 on the CPU."""
    return torch.linalg.svdvals(embeddings.detach().double().cpu())


def effective_rank(embeddings: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 for a collapsed
    set, d for one spread evenly over all d directions."""
    s = singular_values(embeddings)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_class_coding_rate(embeddings: torch.Tensor, labels: torch.Tensor, eps: float = 0.5) -> float:
    """Average over classes (of two or more items) of the coding rate of the class's embeddings."""
    labels = labels.to(embeddings.device)
    rates = [
        coding_rate(embeddings[labels == c].double(), eps=eps).item()
        for c, n in zip(*torch.unique(labels, return_counts=True), strict=True)
        if n > 1
    ]
    return float(sum(rates) / len(rates)) if rates else float("nan")


def distance_ratio(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean intra-class distance over mean distance between class centroids (Roth et al. 2020's
    pi_ratio): near 0 when each class has shrunk to a point."""
    x = embeddings.detach().double().cpu()
    labels = labels.cpu()
    classes = torch.unique(labels)
    intra: list[torch.Tensor] = []
    means: list[torch.Tensor] = []
    for c in classes:
        members = x[labels == c]
        means.append(members.mean(0))
        if len(members) > 1:
            d = torch.cdist(members, members)
            intra.append(d.sum() / (len(members) * (len(members) - 1)))
    centroids = torch.stack(means)
    m = len(centroids)
    if not intra or m < 2:
        return float("nan")
    inter_sum = sum(torch.cdist(centroids[i : i + _BLOCK], centroids).sum() for i in range(0, m, _BLOCK))
    inter = inter_sum / (m * (m - 1))
    return float(torch.stack(intra).mean() / inter)


COLLAPSE_METRICS = ("coding_rate", "class_coding_rate", "effective_rank", "distance_ratio")


def collapse_metrics(embeddings: torch.Tensor, labels: torch.Tensor, eps: float = 0.5) -> dict[str, float]:
    """Coding rate of all embeddings, mean per-class coding rate, effective rank and distance ratio."""
    return {
        "coding_rate": coding_rate(embeddings.detach().double(), eps=eps).item(),
        "class_coding_rate": mean_class_coding_rate(embeddings.detach(), labels, eps=eps),
        "effective_rank": effective_rank(embeddings),
        "distance_ratio": distance_ratio(embeddings, labels),
    }
