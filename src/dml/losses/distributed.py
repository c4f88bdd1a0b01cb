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

    Every rank must pass the same number of items (the class-balanced sampler guarantees it).
    """
    n = world_size()
    if n == 1:
        return embeddings, labels
    chunks = [torch.empty_like(embeddings) for _ in range(n)]
    dist.all_gather(chunks, embeddings.detach().contiguous())
    chunks[dist.get_rank()] = embeddings
    label_chunks = [torch.empty_like(labels) for _ in range(n)]
    dist.all_gather(label_chunks, labels.contiguous())
    return torch.cat(chunks), torch.cat(label_chunks)


def rescale_local_gradients(parameters: Iterable[torch.nn.Parameter], factor: int) -> None:
    """Multiply the gradients of parameters reached only through the local chunk by ``factor`` (N)."""
    if factor == 1:
        return
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(factor)


_PATIENT: dict[str, Any] = {}  # the process group of waits that may be long, made once


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank. The others may wait long (rank 0 scoring a large split): the wait
    goes through a gloo group of its own with a day's timeout, not the training backend's watchdog."""
    if "group" not in _PATIENT:
        _PATIENT["group"] = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_PATIENT["group"])
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` outside DDP. Every rank must call it."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
