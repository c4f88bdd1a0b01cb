"""Miners: choose which pairs or triplets of a batch a loss sees. They run under ``no_grad``.

Triplet miners return (anchor, positive, negative) index tensors; :class:`MultiSimilarityMiner` returns
pairs (a1, p, a2, n). Any miner fits any loss of :mod:`dml.losses.pair`. Random choices use the
miner's own seeded generator, never the process-global RNG.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn

from dml.functional import cosine_similarity, pairwise_distance
from dml.losses.tuples import Pairs, Triplets, iter_triplets, label_masks


class Miner(nn.Module):
    """Base of the miners: ``miner(embeddings, labels)`` returns pairs or triplets of batch indices.

    A miner that draws at random draws from its own generators (one per device, seeded by ``seed``)
    through :meth:`generator` or :meth:`sample`, never from torch's global one; their states go into
    checkpoints through the loss that holds the miner (:meth:`CompositeLoss.random_state`), so that a
    resumed run draws what an uninterrupted one would. Subclasses implement ``forward``.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def generator_states(self) -> dict[str, torch.Tensor]:
        """The state of each of the miner's generators, by device, for checkpoints."""
        return {str(device): g.get_state() for device, g in self._generators.items()}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        for device, state in states.items():
            self.generator(torch.device(device)).set_state(state)

    def sample(self, weights: torch.Tensor) -> torch.Tensor:
        """One column index per row of non-negative ``weights`` (rows with no mass must be removed first)."""
        return torch.multinomial(weights, 1, generator=self.generator(weights.device)).squeeze(1)


def _empty(device: torch.device, n: Literal[3]) -> Triplets:
    return cast(Triplets, tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(n)))


class RandomTripletMiner(Miner):
    """For each anchor, ``triplets_per_anchor`` triplets with a random positive and a random negative."""

    def __init__(self, triplets_per_anchor: int = 1, seed: int = 0):
        super().__init__(seed)
        self.per_anchor = triplets_per_anchor

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        positive, negative = label_masks(labels)
        valid = positive.any(1) & negative.any(1)
        if not valid.any():
            return _empty(labels.device, 3)
        anchors = torch.nonzero(valid).flatten().repeat_interleave(self.per_anchor)
        p = self.sample(positive[anchors].float())
        n = self.sample(negative[anchors].float())
        return anchors, p, n


class SemiHardNegativeMiner(Miner):
    """Every triplet whose negative is semi-hard (FaceNet): D(a,p) < D(a,n) <= D(a,p) + margin.

    ``normalize_embeddings=False``: D between the embeddings as they are (un-normalised, in R^d).
    """

    def __init__(self, margin: float = 0.2, normalize_embeddings: bool = True):
        super().__init__()
        self.margin, self.normalize_embeddings = margin, normalize_embeddings

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        dist = pairwise_distance(embeddings, normalize=self.normalize_embeddings)
        kept = []
        for a, p, n in iter_triplets(None, labels):
            gap = dist[a, n] - dist[a, p]
            keep = (gap > 0) & (gap <= self.margin)
            kept.append((a[keep], p[keep], n[keep]))
        if not kept:
            return _empty(labels.device, 3)
        return cast(Triplets, tuple(torch.cat(parts) for parts in zip(*kept, strict=True)))


def distance_log_weights(dist: torch.Tensor, dim: int, cutoff: float = 0.5) -> torch.Tensor:
    """Log of the distance-weighted sampling weight 1/q(d) (Wu et al. 2017), float64, shape of ``dist``.

    On the unit sphere in ``dim`` dimensions pairwise distances have density
    q(d) ~ d^(dim-2) (1 - d^2/4)^((dim-3)/2); sampling with weight 1/q(d) spreads negatives over all
    distances. Distances below ``cutoff`` are clipped to it. The weights themselves span hundreds of
    orders of magnitude for large ``dim``: normalise them in log space (:func:`distance_probabilities`).
    """
    d = dist.double().clamp_min(cutoff)
    return (2.0 - dim) * torch.log(d) - ((dim - 3) / 2) * torch.log((1.0 - 0.25 * d * d).clamp_min(1e-8))


def distance_probabilities(
    dist: torch.Tensor,
    candidates: torch.Tensor,
    dim: int,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> torch.Tensor:
    """(B, B) float64 probabilities of drawing each of a row's ``candidates`` (a boolean mask).

    Only candidates closer than ``nonzero_loss_cutoff`` (the others cannot give a non-zero loss) share
    the row's mass, in proportion to 1/q(d); the normalisation is a softmax over exactly those log
    weights, so no weight underflows against a larger one outside the row's candidates (self,
    positives). A row with no candidate inside the cut-off draws uniformly among its candidates; a row
    with no candidate at all is zero.
    """
    inside = candidates & (dist < nonzero_loss_cutoff)
    log_w = distance_log_weights(dist, dim, cutoff).masked_fill(~inside, float("-inf"))
    has_inside = inside.any(1, keepdim=True)
    probs = torch.softmax(log_w.masked_fill(~has_inside, 0.0), dim=1)
    uniform = candidates.double() / candidates.sum(1, keepdim=True).clamp_min(1)
    return torch.where(has_inside, probs, uniform)


class DistanceWeightedMiner(Miner):
    """For every positive pair, one negative of the anchor drawn with distance-weighted probability.

    Anchors whose negatives all lie beyond ``nonzero_loss_cutoff`` draw uniformly among them.
    """

    normalize_embeddings = True  # works on unit vectors (cosine similarities) only

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, seed: int = 0):
        super().__init__(seed)
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff

    def negative_weights(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, B) sampling probabilities of each anchor's negatives, rows summing to 1 (0 for no negative)."""
        _, negative = label_masks(labels)
        return distance_probabilities(
            pairwise_distance(embeddings),
            negative,
            embeddings.shape[1],
            self.cutoff,
            self.nonzero_loss_cutoff,
        )

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        positive, negative = label_masks(labels)
        a, p = torch.nonzero(positive & negative.any(1, keepdim=True), as_tuple=True)
        if len(a) == 0:
            return _empty(labels.device, 3)
        weights = self.negative_weights(embeddings, labels)
        return a, p, self.sample(weights[a])


NegativeStrategy = Literal["all", "hard", "semihard", "random", "distance_weighted"]


class EasyPositiveMiner(Miner):
    """Easy positive sampling (EPS, Levi et al.): each anchor's positive is its nearest same-class sample.

    Negatives, chosen per anchor: ``all`` of them, the ``hard``-est, every ``semihard`` one relative to
    the easy positive (D(a,p) < D(a,n) <= D(a,p) + margin), one ``random``, or one
    ``distance_weighted``. Anchors without a positive or a negative are skipped.

    With ``per_anchor=True`` and ``semihard``, each anchor gives one triplet: one of its semi-hard
    negatives at random, or a random negative when it has none (the semi-hard sampling of the framework
    the EPS paper builds on); D is the Euclidean distance either way, between L2-normalised embeddings
    or, with ``normalize_embeddings=False``, between the embeddings as they are.
    """

    def __init__(
        self,
        negatives: NegativeStrategy = "semihard",
        margin: float = 0.2,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        per_anchor: bool = False,
        seed: int = 0,
        normalize_embeddings: bool = True,
    ):
        super().__init__(seed)
        if not normalize_embeddings and negatives == "distance_weighted":
            raise ValueError(
                "EasyPositiveMiner: distance-weighted negatives assume unit-norm embeddings "
                "(the weights are the distance density on the sphere); keep normalize_embeddings=true"
            )
        self.normalize_embeddings = normalize_embeddings
        if negatives not in ("all", "hard", "semihard", "random", "distance_weighted"):
            raise ValueError(
                f"EasyPositiveMiner negatives must be all|hard|semihard|random|distance_weighted, got {negatives!r}"
            )
        if per_anchor and negatives == "all":
            raise ValueError("EasyPositiveMiner(per_anchor=True) needs one negative per anchor, not 'all'")
        self.negatives, self.margin, self.per_anchor = negatives, margin, per_anchor
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff

    def easy_positives(self, dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, positives): each anchor that has a positive, with its nearest one."""
        positive, _ = label_masks(labels)
        anchors = torch.nonzero(positive.any(1)).flatten()
        nearest = dist.masked_fill(~positive, float("inf"))[anchors].argmin(1)
        return anchors, nearest

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        dist = pairwise_distance(embeddings, normalize=self.normalize_embeddings)
        _, negative = label_masks(labels)
        a, p = self.easy_positives(dist, labels)
        keep = negative[a].any(1)
        a, p = a[keep], p[keep]
        if len(a) == 0:
            return _empty(labels.device, 3)
        neg_rows = negative[a]
        if self.negatives == "semihard" and self.per_anchor:
            gap = dist[a] - dist[a, p][:, None]
            semihard = neg_rows & (gap > 0) & (gap <= self.margin)
            pool = torch.where(semihard.any(1, keepdim=True), semihard, neg_rows)
            return a, p, self.sample(pool.float())
        if self.negatives in ("all", "semihard"):
            rows, n = torch.nonzero(neg_rows, as_tuple=True)
            aa, pp = a[rows], p[rows]
            if self.negatives == "semihard":
                gap = dist[aa, n] - dist[aa, pp]
                ok = (gap > 0) & (gap <= self.margin)
                aa, pp, n = aa[ok], pp[ok], n[ok]
            return aa, pp, n
        if self.negatives == "hard":
            n = dist[a].masked_fill(~neg_rows, float("inf")).argmin(1)
        elif self.negatives == "random":
            n = self.sample(neg_rows.float())
        else:
            weights = distance_probabilities(
                dist, negative, embeddings.shape[1], self.cutoff, self.nonzero_loss_cutoff
            )
            n = self.sample(weights[a])
        return a, p, n


class MultiSimilarityMiner(Miner):
    """Multi-Similarity pair mining (Wang et al. 2019), S the cosine similarity.

    A negative pair (a, n) is kept when S_an + epsilon > min_p S_ap (harder than the anchor's hardest
    positive). Positive pairs: with ``positives='hard'`` (the paper) (a, p) is kept when
    S_ap - epsilon < max_n S_an; with ``positives='easy'`` (EPS + MS) each anchor keeps only its most
    similar positive. ``negative_reference='easy_positive'`` mines negatives against the anchor's
    most similar positive instead (S_an + epsilon > max_p S_ap): relative to the positive EPS keeps.
    """

    normalize_embeddings = True  # works on unit vectors (cosine similarities) only

    def __init__(
        self,
        epsilon: float = 0.1,
        positives: Literal["hard", "easy"] = "hard",
        negative_reference: Literal["hardest_positive", "easy_positive"] = "hardest_positive",
    ):
        super().__init__()
        if positives not in ("hard", "easy"):
            raise ValueError(f"MultiSimilarityMiner positives must be 'hard' or 'easy', got {positives!r}")
        if negative_reference not in ("hardest_positive", "easy_positive"):
            raise ValueError(
                "MultiSimilarityMiner negative_reference must be 'hardest_positive' or 'easy_positive', "
                f"got {negative_reference!r}"
            )
        self.epsilon, self.positives, self.negative_reference = epsilon, positives, negative_reference

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Pairs:
        sim = cosine_similarity(embeddings)
        positive, negative = label_masks(labels)
        if self.negative_reference == "hardest_positive":
            reference = sim.masked_fill(~positive, float("inf")).min(1, keepdim=True).values
        else:  # an anchor without a positive mines no negative, as with the hardest positive (+inf)
            reference = sim.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
            reference = reference.masked_fill(~positive.any(1, keepdim=True), float("inf"))
        hardest_neg = sim.masked_fill(~negative, float("-inf")).max(1, keepdim=True).values
        a2, n = torch.nonzero(negative & (sim + self.epsilon > reference), as_tuple=True)
        if self.positives == "hard":
            a1, p = torch.nonzero(positive & (sim - self.epsilon < hardest_neg), as_tuple=True)
        else:
            a1 = torch.nonzero(positive.any(1)).flatten()
            p = sim.masked_fill(~positive, float("-inf"))[a1].argmax(1)
        return a1, p, a2, n
