"""Negative-proxy sampling (Partial FC's sample rate): at each training step the proxy terms see the
proxies of the batch's classes and a random share of the others, drawn afresh.

With 10^6 classes the batch-by-class similarity matrix, its softmax and all-proxy AntiCo's Gram matrix cost
in proportion to the classes seen; a rate r makes that r C plus the batch's classes. The positives are
always seen. The draw has a fixed size (so nothing is read back from the device): the rows of the batch's
labels (B of them, a class repeated k times counting 1/k each, a class another rank holds 0) and
``ceil(r m)`` distinct rows of this rank's m, those of a class in the batch counting 0 (seen already among
the positives). Every active class counts 1 in total, over all ranks, whichever rows it came through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dml.functional import once_each
from dml.losses.miners import Miner
from dml.losses.sharded import sum_over_ranks

if TYPE_CHECKING:
    from dml.losses.proxy import ProxyBank


@dataclass(frozen=True)
class Active:
    """The proxies one step sees on this rank: ``rows`` of the bank, their global ``classes``, the
    ``weights`` they count with (each active class 1 in all, over all ranks) and ``count``, the number of
    active classes over all ranks (a 0-d tensor on the device)."""

    rows: torch.Tensor
    classes: torch.Tensor
    weights: torch.Tensor
    count: torch.Tensor


class ProxySampler(Miner):
    """Draws the proxies a training step sees (module docstring), from its own seeded generator, whose
    state goes into checkpoints with the loss's miners'.

    Args:
        rate: the share of this rank's proxies drawn as negatives, in (0, 1).
        seed: the generator's seed (on a sharded bank each rank draws from its own: :meth:`for_rank`).
    """

    def __init__(self, rate: float, seed: int = 0):
        if not 0 < rate < 1:
            raise ValueError(f"the proxy sample rate must lie in (0, 1) (1 samples nothing), got {rate}")
        super().__init__(seed)
        self.rate = rate

    def for_rank(self, rank: int) -> None:
        """Draw from a stream of rank ``rank``'s own (each rank samples a slice of its own)."""
        if self._generators:
            raise RuntimeError("the proxy sampler has drawn already: set its rank before the first step")
        self.seed = int(np.random.SeedSequence([self.seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)

    def forward(self, bank: ProxyBank, labels: torch.Tensor) -> Active:  # type: ignore[override]
        """The proxies of ``bank`` (this rank's slice of a sharded one) that this step sees, for the global
        batch's ``labels``."""
        with torch.no_grad():
            m, device = len(bank.weight), labels.device
            negatives = torch.randperm(m, generator=self.generator(device), device=device)
            negatives = negatives[: min(m, math.ceil(self.rate * m))]
            local = labels - bank.offset
            owned = (local >= 0) & (local < m)
            in_batch = ((negatives + bank.offset)[:, None] == labels[None, :]).any(dim=1)
            rows = torch.cat([local.clamp(0, m - 1), negatives])
            positive_weights = once_each(labels) * owned
            weights = torch.cat([positive_weights, (~in_batch).to(positive_weights.dtype)])
            count = weights.sum()
            if bank.sharded:
                count = sum_over_ranks(count)
        return Active(rows, rows + bank.offset, weights, count)
