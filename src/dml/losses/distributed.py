"""Losses over the global batch under DDP: gather every rank's embeddings, keep the local gradient.

With B/N items on each of N ranks, each rank gathers all B embeddings (its own chunk keeps its
gradient), so every rank computes the loss of the whole batch, as one process with B would. DDP then
averages gradients over ranks: parameters that only the local chunk reaches (backbone, head) receive
1/N of the single-process gradient, so :func:`rescale_local_gradients` multiplies them by N; parameters
that every rank's loss reaches in full (proxies, margin beta) already average to the right value. The
rescaling happens once per optimizer step, on the accumulated gradient (DMLModule.on_before_optimizer_step):
after each backward it would count the micro-batches accumulated before it N times over.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (embeddings, labels), in rank order; only this rank's chunk carries gradient.

    The ranks may pass different numbers of items (dml's samplers never do; a sampler of one's own, or a
    last short batch, may): each rank's count is exchanged on the host, over a gloo group (no wait for the
    device), and the chunks are padded to the largest for the gather and cut back after it.
    """
    n = world_size()
    if n == 1:
        return embeddings, labels
    sizes = _sizes_on_every_rank(len(embeddings))
    most = max(sizes)
    chunks = _gathered(embeddings.detach(), most)
    chunks[dist.get_rank()] = embeddings
    label_chunks = _gathered(labels, most)
    return (
        torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)]),
        torch.cat([chunk[:size] for chunk, size in zip(label_chunks, sizes, strict=True)]),
    )


def _gathered(x: torch.Tensor, most: int) -> list[torch.Tensor]:
    """Every rank's ``x``, each padded to ``most`` rows."""
    if len(x) < most:
        x = torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))])
    chunks = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(chunks, x.contiguous())
    return chunks


def _sizes_on_every_rank(size: int) -> list[int]:
    """Each rank's ``size``, exchanged over a gloo group with CPU tensors: under NCCL a count on the
    device would have to be read back, waiting for the forward pass queued before it."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([size]), group=_host_group("sizes", timedelta(minutes=30)))
    return [int(s) for s in sizes]


def rescale_local_gradients(parameters: Iterable[torch.nn.Parameter], factor: int) -> None:
    """Multiply the gradients of parameters reached only through the local chunk by ``factor`` (N)."""
    if factor == 1:
        return
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(factor)


_HOST_GROUPS: dict[tuple[str, int], Any] = {}  # gloo groups of host-side exchanges, made once per run


def _host_group(name: str, timeout: timedelta) -> Any:
    """A gloo process group of every rank for exchanges on the host, made on first use (every rank makes
    its groups in the same order: each at the same collective call) and kept for the default group's life."""
    key = (name, id(dist.group.WORLD))
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _HOST_GROUPS[key]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank. The others may wait long (rank 0 scoring a large split): the wait
    goes through a gloo group of its own with a day's timeout, not the training backend's watchdog."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group("patient", timedelta(days=1)))
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` outside DDP. Every rank must call it."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
