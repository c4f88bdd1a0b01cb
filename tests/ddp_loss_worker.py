"""Run by tests/test_ddp.py in its own interpreter, on 2 gloo ranks: the class-balanced sampler gives
the ranks disjoint classes that make up the single-process batch, and every loss of conf/loss on 2 ranks x
B/2 matches one process x B, with a class split between the ranks. Exits non-zero, naming what differs (loss or gradients beyond 1e-5)."""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from benchmarks.losses import losses, total

from dml.losses.distributed import gather_batch, rescale_local_gradients

B, D, C, WORLD = 24, 16, 12, 2


class Model(torch.nn.Module):
    """A linear 'network' and one loss of conf/loss, as in DMLModule."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(D, D)
        self.loss = losses(C, D)[name]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return total(self.loss, *gather_batch(F.normalize(self.net(x), dim=1), y))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # 3 classes x 8 items in the sampler's layout, class by class: each rank holds 12 items, so the middle
    # class straddles the two ranks (the sampler splits by items when the world size does not divide P).
    return torch.randn(B, D, generator=g), torch.arange(3).repeat_interleave(8)


def grads(model: Model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def rank_main(rank: int, name: str, port: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = Model(name)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    x, y = batch()
    local = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    loss = ddp(x[local], y[local])
    loss.backward()
    rescale_local_gradients(model.net.parameters(), WORLD)
    if rank == 0:
        out["loss"] = loss.detach()
        out["grads"] = grads(model)
    # Release DDP's pending gloo work before the group goes: tensors still held by gloo's threads at
    # interpreter exit abort the process now and then (SIGABRT, "terminate called without an active
    # exception"), which failed this test at random.
    del ddp, loss
    gc.collect()
    dist.destroy_process_group()


def sampler_rank_main(rank: int, port: str, out: dict) -> None:
    """Each live rank draws its batches; rank 0 checks that they split every global batch by class."""
    from dml.data import ClassBalancedBatchSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    labels = torch.arange(20).repeat_interleave(5)
    mine = list(
        ClassBalancedBatchSampler(labels, 8, 3, seed=5, num_replicas=dist.get_world_size(), rank=rank)
    )
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        single = list(ClassBalancedBatchSampler(labels, 8, 3, seed=5))
        ok = True
        for step, batch in enumerate(single):
            parts = [everyone[r][step] for r in range(WORLD)]
            classes = [set(labels[p].tolist()) for p in parts]
            ok &= not (classes[0] & classes[1]) and sum(parts, []) == batch
        out["sampler"] = ok
    dist.destroy_process_group()


def main(port: str) -> None:
    out = mp.Manager().dict()
    mp.spawn(sampler_rank_main, args=(port, out), nprocs=WORLD, join=True)
    print(f"{'sampler':<30} classes disjoint across ranks {'ok' if out['sampler'] else 'DIFFERS'}")
    if not out["sampler"]:
        sys.exit("the ranks' batches overlap in classes or do not make up the global batch")
    port = str(int(port) + 1)
    names = list(losses(C, D))
    failures = []
    for name in names:
        single = Model(name)
        x, y = batch()
        loss = single(x, y)
        loss.backward()
        expected = grads(single)
        out = mp.Manager().dict()
        mp.spawn(rank_main, args=(name, port, out), nprocs=WORLD, join=True)
        ok = torch.allclose(out["loss"], loss.detach(), atol=1e-5) and set(out["grads"]) == set(expected)
        ok = ok and all(torch.allclose(out["grads"][k], v, atol=1e-5) for k, v in expected.items())
        print(f"{name:<30} loss {loss.item():.6f} ddp {out['loss'].item():.6f} {'ok' if ok else 'DIFFERS'}")
        if not ok:
            failures.append(name)
        port = str(int(port) + 1)
    if failures:
        sys.exit(f"DDP differs from one process for: {', '.join(failures)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "29731")
