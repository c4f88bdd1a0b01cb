"""Pair- and triplet-based losses: contrastive, triplet, margin and multi-similarity.

Each is called as ``loss(embeddings, labels, indices=None)``: ``indices`` is a miner's output (pairs or
triplets, see :mod:`dml.losses.tuples`); without it every valid pair or triplet of the batch is used,
enumerated in chunks so that no B x B x B tensor is ever built.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dml.functional import (
    cosine_similarity,
    masked_logsumexp_plus_one,
    pairwise_distance,
    squared_distance,
)
from dml.losses.tuples import (
    Pairs,
    Triplets,
    iter_triplets,
    mean_of_nonzero,
    to_pairs,
)


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006) in pytorch-metric-learning's form.

    L = mean_nonzero[(D(a,p) - pos_margin)_+] + mean_nonzero[(neg_margin - D(a,n))_+] over the pairs,
    D the Euclidean distance of L2-normalised embeddings (``normalize_embeddings=False``: of the
    embeddings as they are).
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, normalize_embeddings: bool = True):
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.normalize_embeddings = normalize_embeddings

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Pairs | Triplets | None = None
    ) -> torch.Tensor:
        a1, p, a2, n = to_pairs(indices, labels)
        dist = pairwise_distance(embeddings, normalize=self.normalize_embeddings)
        pos = F.relu(dist[a1, p] - self.pos_margin)
        neg = F.relu(self.neg_margin - dist[a2, n])
        return mean_of_nonzero(pos) + mean_of_nonzero(neg) + 0 * dist.sum()


class TripletLoss(nn.Module):
    """Triplet margin loss: (D(a,p) - D(a,n) + margin)_+ over the triplets.

    By default D is the Euclidean distance of L2-normalised embeddings and the loss is averaged over
    the non-zero triplets (pytorch-metric-learning's ``TripletMarginLoss`` with its default reducer).

    Args:
        margin: the margin.
        squared: D is the squared Euclidean distance (the EPS paper's D, §3, and the triplet loss of the
            framework it builds on).
        reduction: ``mean_nonzero`` divides by the number of non-zero triplets, ``mean`` by the number
            of triplets (the EPS framework's).
        normalize_embeddings: D between L2-normalised embeddings; False, between the embeddings as
            they are (un-normalised embeddings in R^d).
    """

    reductions = ("mean_nonzero", "mean")

    def __init__(
        self,
        margin: float = 0.2,
        squared: bool = False,
        reduction: str = "mean_nonzero",
        normalize_embeddings: bool = True,
    ):
        super().__init__()
        if reduction not in self.reductions:
            raise ValueError(f"TripletLoss reduction must be one of {self.reductions}, got {reduction!r}")
        self.margin, self.squared, self.reduction = margin, squared, reduction
        self.normalize_embeddings = normalize_embeddings

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Pairs | Triplets | None = None
    ) -> torch.Tensor:
        distance = squared_distance if self.squared else pairwise_distance
        dist = distance(embeddings, normalize=self.normalize_embeddings)
        total, count = 0 * dist.sum(), 0
        for a, p, n in iter_triplets(indices, labels):
            values = F.relu(dist[a, p] - dist[a, n] + self.margin)
            total = total + values.sum()
            count += int((values > 0).sum()) if self.reduction == "mean_nonzero" else len(values)
        return total / max(count, 1)


class MarginLoss(nn.Module):
    """Margin loss (Wu et al. 2017) with a learnable boundary beta.

    For each triplet: (D(a,p) - beta + alpha)_+ + (beta - D(a,n) + alpha)_+, summed and divided by the
    number of non-zero terms; plus nu * beta. beta is one scalar, or one per class (of the anchor) with
    ``per_class=True``; it trains at its own learning rate ``beta_lr``.

    Args:
        alpha: the margin around beta.
        beta: initial beta.
        nu: beta's regulariser weight.
        per_class: one beta per class.
        learn_beta: make beta a parameter.
        beta_lr: learning rate of beta (its own optimizer group); ``None`` uses the loss group's.
        beta_weight_decay: weight decay of beta; ``None`` uses the loss group's (the framework the EPS
            paper builds on gives beta none).
        num_classes: needed with ``per_class``; supplied by :class:`CompositeLoss`.
        normalize_embeddings: D between L2-normalised embeddings; False, between the embeddings as
            they are.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        per_class: bool = False,
        learn_beta: bool = True,
        beta_lr: float | None = 5e-4,
        beta_weight_decay: float | None = None,
        num_classes: int | None = None,
        normalize_embeddings: bool = True,
    ):
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        if per_class and num_classes is None:
            raise ValueError("MarginLoss(per_class=True) needs num_classes")
        init = torch.full((cast(int, num_classes) if per_class else 1,), float(beta))  # checked above
        self.beta = nn.Parameter(init, requires_grad=learn_beta)
        self.alpha, self.nu, self.per_class = alpha, nu, per_class
        self.param_lr, self.param_weight_decay = beta_lr, beta_weight_decay

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Pairs | Triplets | None = None
    ) -> torch.Tensor:
        dist = pairwise_distance(embeddings, normalize=self.normalize_embeddings)
        total, divisor = 0 * dist.sum() + 0 * self.beta.sum(), 0
        beta_sum: torch.Tensor | int = 0
        for a, p, n in iter_triplets(indices, labels):
            beta = (self.beta[labels[a]] if self.per_class else self.beta.expand(len(a))).to(dist.dtype)
            pos = F.relu(dist[a, p] - beta + self.alpha)
            neg = F.relu(beta - dist[a, n] + self.alpha)
            total = total + (pos + neg).sum()
            divisor += int((pos > 0).sum() + (neg > 0).sum())
            beta_sum = beta_sum + beta.sum()
        # nu * beta: per class, beta of each triplet's anchor over the same divisor (as in PML).
        reg_term = (
            self.nu * (beta_sum / max(divisor, 1) if self.per_class else self.beta.sum()) if self.nu else 0
        )
        return total / max(divisor, 1) + reg_term


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss (Wang et al. 2019), averaged over anchors.

    L_i = 1/alpha log(1 + sum_{p} exp(-alpha (S_ip - lambda))) + 1/beta log(1 + sum_{n} exp(beta (S_in - lambda)))
    over the anchor's positive and negative pairs (all of them, or those a miner kept), S the cosine
    similarity. Pair with :class:`~dml.losses.miners.MultiSimilarityMiner` for the paper's mining.
    """

    normalize_embeddings = True  # works on unit vectors (cosine similarities) only

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5):
        super().__init__()
        self.alpha, self.beta, self.base = alpha, beta, base

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Pairs | Triplets | None = None
    ) -> torch.Tensor:
        a1, p, a2, n = to_pairs(indices, labels)
        sim = cosine_similarity(embeddings)
        pos_mask = torch.zeros_like(sim, dtype=torch.bool)
        neg_mask = torch.zeros_like(sim, dtype=torch.bool)
        pos_mask[a1, p] = True
        neg_mask[a2, n] = True
        pos = masked_logsumexp_plus_one(-self.alpha * (sim - self.base), pos_mask, dim=1) / self.alpha
        neg = masked_logsumexp_plus_one(self.beta * (sim - self.base), neg_mask, dim=1) / self.beta
        return (pos + neg).mean()
