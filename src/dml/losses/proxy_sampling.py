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
from torch import nn

from dml.functional import once_each
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


class ProxySampler(nn.Module):
    """Draws the proxies a training step sees (module docstring).

    Draw n of a run is a function of (``seed``, the rank when the bank is sharded, n) alone: a generator
    seeded with those, on the labels' device. Replicated over processes, every rank therefore draws the
    same proxies, as it must; a resume goes on with the next draw, on any number of processes and on any
    device, since n goes into checkpoints with the miners' random state (the same n on every rank).

    Args:
        rate: the share of this rank's proxies drawn as negatives, in (0, 1).
        seed: the draws' seed.
    """

    def __init__(self, rate: float, seed: int = 0):
        if not 0 < rate < 1:
            raise ValueError(f"the proxy sample rate must lie in (0, 1) (1 samples nothing), got {rate}")
        super().__init__()
        self.rate, self.seed, self.rank, self.draws = rate, seed, 0, 0

    def for_rank(self, rank: int) -> None:
        """Draw from rank ``rank``'s own streams (each rank of a sharded bank samples a slice of its own)."""
        self.rank = rank

    def generator_states(self) -> dict[str, torch.Tensor]:
        """How many draws were made: checkpoints keep it with the miners' generators."""
        return {"draws": torch.tensor(self.draws)}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        self.draws = int(states["draws"])

    def _generator(self, device: torch.device) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, self.rank, self.draws]).generate_state(2, dtype=np.uint32)
        self.draws += 1
        return torch.Generator(device=device).manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)

    def forward(self, bank: ProxyBank, labels: torch.Tensor) -> Active:  # type: ignore[override]
        """The proxies of ``bank`` (this rank's slice of a sharded one) that this step sees, for the global
        batch's ``labels``."""
        with torch.no_grad():
            m, device = len(bank.weight), labels.device
            negatives = torch.randperm(m, generator=self._generator(device), device=device)
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
