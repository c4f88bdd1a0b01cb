"""Proxy-based losses and the class-proxy bank they share with AntiCo's proxy variants."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dml.functional import cosine_similarity, masked_logsumexp_plus_one
from dml.losses import sharded

if TYPE_CHECKING:
    from dml.losses.proxy_sampling import Active


class ProxyBank(nn.Module):
    """One learnable proxy per training class, shape (num_classes, embedding_size).

    Initialised kaiming-normal (fan_out) as in the Proxy-Anchor code, or normal with standard deviation
    ``init_std`` (the AntiCo code draws randn / 8: ``init_std=0.125``). One bank per model is shared by
    every proxy-based term, so Proxy-Anchor and AntiCo's proxy variants move the same vectors.
    """

    def __init__(self, num_classes: int, embedding_size: int, init_std: float | None = None):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"ProxyBank needs num_classes >= 1 and embedding_size >= 1, got {num_classes}, {embedding_size}"
            )
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        if init_std is None:
            nn.init.kaiming_normal_(self.weight, mode="fan_out")
        else:
            nn.init.normal_(self.weight, std=init_std)
        self.offset, self.total = 0, num_classes  # the classes this bank holds: offset .. offset + rows
        self.active: Active | None = None  # the proxies this step sees, when a sampler drew them

    @property
    def partial(self) -> bool:
        """Whether the terms see part of the classes here: a slice (sharded) or a sample (:attr:`active`)."""
        return self.sharded or self.active is not None

    def seen(self) -> sharded.Proxies:
        """The proxies the terms see on this rank: the sampled ones, or all it holds."""
        if self.active is not None:
            a = self.active
            return sharded.Proxies(self.weight[a.rows], a.classes, a.weights, a.count, self.sharded)
        classes = torch.arange(self.offset, self.offset + len(self.weight), device=self.weight.device)
        return sharded.Proxies(self.weight, classes, None, self.total, True)

    @property
    def sharded(self) -> bool:
        """Whether this bank holds only a slice of the classes (:meth:`shard`)."""
        return len(self.weight) != self.total

    def shard(self, world: int, rank: int) -> None:
        """Keep only rank ``rank``'s slice of the classes (of ``world`` ranks; see
        :mod:`dml.losses.sharded`); the losses then compute over all the ranks' proxies together.

        Raises:
            ValueError: fewer classes than ranks.
        """
        from dml.losses.sharded import shard_bounds

        if self.sharded:
            raise ValueError("this proxy bank is sharded already")
        if world > self.total:
            raise ValueError(
                f"{self.total} class proxies cannot be sharded over {world} ranks (one each at least)"
            )
        lo, hi = shard_bounds(self.total, world, rank)
        self.weight = nn.Parameter(self.weight.detach()[lo:hi].clone())
        self.offset = lo

    @classmethod
    def resolve(
        cls, bank: ProxyBank | None, num_classes: int | None, embedding_size: int | None, owner: str
    ) -> ProxyBank:
        """``bank`` when given (the composite's shared one), else a new bank of its own for ``owner``."""
        if bank is not None:
            return bank
        if num_classes is None or embedding_size is None:
            raise ValueError(f"{owner} needs a proxy bank, or num_classes and embedding_size to make one")
        return cls(num_classes, embedding_size)

    @property
    def num_classes(self) -> int:
        """All the classes, on every rank of a sharded bank."""
        return self.total

    def normalized(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised proxies, all of them or the rows ``classes``; shape (m, d)."""
        w = self.weight if classes is None else self.weight[classes]
        return F.normalize(w, dim=1)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels out of range are named here on the CPU; on a GPU reading them would make the host wait for
    the device every step (dml's datamodules number the training classes 0..C-1 and check C against the
    loss's: an out-of-range label there is a bug, not an input)."""
    if labels.device.type != "cpu":
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a proxy loss with {num_classes} classes, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + delta)))
    with s the cosine similarity, P+ the proxies with a positive in the batch and P all proxies.
    """

    normalize_embeddings = True  # works on unit vectors (cosine similarities) only

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_size: int | None = None,
        alpha: float = 32.0,
        delta: float = 0.1,
        proxies: ProxyBank | None = None,
    ):
        super().__init__()
        self.proxies = ProxyBank.resolve(proxies, num_classes, embedding_size, "ProxyAnchorLoss")
        self.alpha, self.delta = alpha, delta

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: embeddings (B, d); labels (B,) in [0, C). Returns a scalar."""
        num_classes = self.proxies.num_classes
        _check_labels(labels, num_classes)
        if self.proxies.partial:
            return sharded.proxy_anchor(embeddings, labels, self.proxies.seen(), self.alpha, self.delta)
        # float32 logits: alpha * cos reaches 64 and exp of that overflows half precision.
        cos = cosine_similarity(embeddings, self.proxies.weight)  # (B, C)
        pos = labels[:, None] == torch.arange(num_classes, device=labels.device)  # one_hot, unchecked
        pos_term = masked_logsumexp_plus_one(-self.alpha * (cos - self.delta), pos, dim=0)  # (C,)
        neg_term = masked_logsumexp_plus_one(self.alpha * (cos + self.delta), ~pos, dim=0)  # (C,)
        with_pos = pos.any(dim=0)
        # where(), not pos_term[with_pos]: indexing by a mask waits for the device to count it
        positive = torch.where(with_pos, pos_term, torch.zeros_like(pos_term)).sum()
        return positive / with_pos.sum().clamp(min=1) + neg_term.sum() / num_classes


class ProxyNCALoss(nn.Module):
    """ProxyNCA (Movshovitz-Attias et al. 2017) on L2-normalised embeddings and proxies.

    L = mean_x -log softmax_c(-scale * ||x - p_c||^2)[y_x]. ``scale=9`` is the Proxy-Anchor code's
    baseline (embeddings and proxies both scaled by 3). ``exclude_positive=True`` gives the original
    paper's form, whose denominator sums over the other classes only.
    """

    normalize_embeddings = True  # works on unit vectors (cosine similarities) only

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_size: int | None = None,
        scale: float = 9.0,
        exclude_positive: bool = False,
        proxies: ProxyBank | None = None,
    ):
        super().__init__()
        self.proxies = ProxyBank.resolve(proxies, num_classes, embedding_size, "ProxyNCALoss")
        self.scale, self.exclude_positive = scale, exclude_positive

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: embeddings (B, d); labels (B,) in [0, C). Returns a scalar."""
        _check_labels(labels, self.proxies.num_classes)
        if self.proxies.partial:
            return sharded.proxy_nca(
                embeddings, labels, self.proxies.seen(), self.scale, self.exclude_positive
            )
        logits = -self.scale * (
            2 - 2 * cosine_similarity(embeddings, self.proxies.weight)
        )  # -scale * ||x - p||^2
        positive = logits.gather(1, labels[:, None]).squeeze(1)
        if self.exclude_positive:
            logits = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return (torch.logsumexp(logits, dim=1) - positive).mean()
