"""Class-balanced P x K batch sampling, reproducible per seed and rank-aware."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from dml.errors import UserError


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yields batches of P classes x K samples each, drawn afresh every epoch.

    Each global batch takes P distinct classes at random; each class gives the next K items of its own
    shuffled pool, so every item is seen before any repeats (a class smaller than K repeats items). The
    draw depends only on (seed, epoch): every rank draws the same global batch, laid out class by class,
    and keeps its own contiguous share of P x K / num_replicas items, so no rank needs to talk to
    another and the ranks together hold exactly the single-process batch. When num_replicas divides P
    the shares are whole classes; otherwise a class may straddle two ranks, which changes nothing for
    the loss, computed on the gathered batch (a batch of 30 x 4 = 120 splits over 1, 2, 4 or 8 GPUs).

    Args:
        labels: (N,) class label of each dataset item.
        classes_per_batch: P, classes per global batch.
        samples_per_class: K.
        num_batches: batches per epoch; default N // (P * K), at least 1.
        seed: base seed; the epoch's generator is seeded with (seed, epoch).
        num_replicas, rank: the distributed world size and this process's rank.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        labels = torch.as_tensor(labels).long()
        self.classes, inverse = torch.unique(labels, return_inverse=True)
        self.members = [torch.nonzero(inverse == c).flatten().numpy() for c in range(len(self.classes))]
        p, k = classes_per_batch, samples_per_class
        if k < 1 or p < 1:
            raise UserError(f"need at least 1 class and 1 sample per class per batch, got P={p}, K={k}")
        if p > len(self.classes):
            raise UserError(
                f"a batch of {p} classes x {k} samples needs {p} classes but the training split has "
                f"{len(self.classes)}; lower dataset.batch_size or raise dataset.samples_per_class"
            )
        if (p * k) % num_replicas:
            raise UserError(
                f"dataset.batch_size={p * k} cannot be split evenly over {num_replicas} processes; choose a "
                f"batch size divisible by the number of devices ({num_replicas}) and by "
                f"dataset.samples_per_class={k}, e.g. {_lcm(num_replicas, k) * max(1, p * k // _lcm(num_replicas, k))}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.p, self.k, self.seed, self.num_replicas, self.rank = p, k, seed, num_replicas, rank
        self.num_batches = num_batches or max(1, len(labels) // (p * k))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; the next iteration draws that epoch's batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = [rng.permutation(m) for m in self.members]
        cursor = [0] * len(pools)
        share = self.p * self.k // self.num_replicas
        for _ in range(self.num_batches):
            batch_classes = rng.choice(len(pools), size=self.p, replace=False)
            batch = []
            for c in batch_classes:
                taken: list[int] = []
                while len(taken) < self.k:
                    if cursor[c] == len(pools[c]):
                        pools[c], cursor[c] = rng.permutation(self.members[c]), 0
                    n = min(self.k - len(taken), len(pools[c]) - cursor[c])
                    taken.extend(pools[c][cursor[c] : cursor[c] + n].tolist())
                    cursor[c] += n
                batch.append(taken)
            flat = [i for group in batch for i in group]
            yield flat[self.rank * share : (self.rank + 1) * share]


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class RandomBatchSampler(Sampler[list[int]]):
    """Plain random batches (Proxy-Anchor's official loader: shuffle, drop the incomplete last batch).

    Every epoch draws one permutation of the items from (seed, epoch); the global batches are its
    consecutive slices of ``batch_size``, and each of ``num_replicas`` ranks keeps its contiguous share
    of each, so the ranks together see exactly the single-process batch.

    Args:
        num_items: N, the number of training items.
        batch_size: the global batch size B, divisible by ``num_replicas``.
        seed: base seed; the epoch's generator is seeded with (seed, epoch).
        num_replicas, rank: the distributed world size and this process's rank.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or batch_size > num_items:
            raise UserError(
                f"a random batch of {batch_size} items needs at least that many training items, and the "
                f"training split has {num_items}; lower dataset.batch_size"
            )
        if batch_size % num_replicas:
            raise UserError(
                f"dataset.batch_size={batch_size} cannot be split evenly over {num_replicas} processes; "
                "choose a batch size divisible by the number of devices"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; the next iteration draws that epoch's batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        share = self.batch_size // self.num_replicas
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * share
            yield order[start : start + share].tolist()
