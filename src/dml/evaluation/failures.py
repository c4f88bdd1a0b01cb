"""Which retrievals a person looks at first: the failures, worst first, then a sample of the successes.

A query fails when its first neighbour is of another class. Among failures, the worst is the one whose
first right neighbour comes latest (none within k: worst of all), and among those, the one whose wrong
first neighbour is the most confident (the highest similarity, or the smallest distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shown:
    """The queries to show, in order, and how all the queries fall: ``failures``, ``successes`` (of which
    ``sampled`` are shown) and ``unjudged`` (no class, or no first neighbour with one)."""

    order: list[int]
    failures: int
    successes: int
    sampled: int
    unjudged: int

    def summary(self) -> str:
        """One line: how many fail, how many succeed, what is shown."""
        total = self.failures + self.successes + self.unjudged
        if not self.failures + self.successes:
            return f"{total} queries, none with a class to judge them by"
        shown_failures = min(self.failures, len(self.order))
        text = f"{total} queries: {self.failures} fail (their first neighbour is of another class)"
        if shown_failures:
            text += (
                f", {'all' if shown_failures == self.failures else shown_failures} shown first, worst first"
            )
        text += f"; {self.successes} succeed" + (
            f", {self.sampled} of them shown at random" if self.sampled else ""
        )
        return text + (f"; {self.unjudged} without a class" if self.unjudged else "")


def failures_first(
    query_labels: torch.Tensor,
    neighbour_labels: torch.Tensor,
    first_scores: torch.Tensor,
    higher_is_better: bool = True,
    shown: int = 50,
    seed: int = 0,
) -> Shown:
    """Up to ``shown`` queries: the failures first (worst first, as many as fit), then successes drawn at
    random (``seed``) in their order, then unjudged queries in their order.

    Args:
        query_labels: (n,) each query's class, -1 where unknown.
        neighbour_labels: (n, k) its neighbours' classes, best first, -1 where unknown or missing.
        first_scores: (n,) its first neighbour's score (a similarity; a distance with
            ``higher_is_better=False``).
    """
    q, n = query_labels.long(), neighbour_labels.long()
    k = n.shape[1]
    first = n[:, 0] if k else torch.full_like(q, -1)
    judged = (q >= 0) & (first >= 0)
    failed = judged & (first != q)
    right = n == q[:, None]
    first_right = torch.where(right.any(1), right.int().argmax(1), torch.full_like(q, k))  # first True
    confidence = first_scores.float() if higher_is_better else -first_scores.float()
    failures = torch.nonzero(failed).flatten().tolist()
    failures.sort(key=lambda i: (-int(first_right[i]), -float(confidence[i]), i))
    successes = torch.nonzero(judged & ~failed).flatten().numpy()
    room = max(0, shown - len(failures))
    sample = sorted(np.random.default_rng(seed).permutation(successes)[:room].tolist())
    unjudged = torch.nonzero(~judged).flatten().tolist()
    order = (failures + sample + unjudged)[:shown]
    return Shown(order, len(failures), len(successes), len(sample), len(unjudged))
