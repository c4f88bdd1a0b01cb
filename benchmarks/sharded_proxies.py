"""Class proxies sharded over processes against replicated on each: per-process memory and step time.

    python -m benchmarks.sharded_proxies [--classes 100000 1000000] [--processes 1 2 4] [--dim 512]
        [--batch 120] [--steps 3]

Each configuration runs in fresh gloo processes on the CPU: a Proxy-Anchor + AntiCo (batch proxies) loss
on a global batch of ``--batch`` random unit embeddings (each process ``batch / N`` of them, gathered),
its backward pass and an Adam step on the proxies, ``--steps`` times after one warm-up step. Reported per
process: the proxies' own memory (parameters, gradients and Adam's two moments: 4 x rows x d x 4 bytes),
the process's peak resident memory above what it held before the bank was made, and the median step time.
A configuration whose replicated bank would not fit in this machine's memory is skipped and said so.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dml.losses import AntiCoLoss, ProxyAnchorLoss
from dml.losses.distributed import gather_batch
from dml.losses.proxy import ProxyBank


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_main(
    rank: int, world: int, port: int, classes: int, dim: int, batch: int, steps: int, shard: bool, out
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    before = peak_mib()
    torch.manual_seed(0)
    bank = ProxyBank(classes, dim)
    if shard:
        bank.shard(world, rank)
    anchor, antico = ProxyAnchorLoss(proxies=bank), AntiCoLoss("batch_proxy", proxies=bank)
    optimizer = torch.optim.Adam(bank.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        x = F.normalize(torch.randn(batch // world, dim, generator=g), dim=1).requires_grad_()
        y = torch.randint(0, classes, (batch // world,), generator=g)
        start = time.perf_counter()
        xs, ys = gather_batch(x, y)
        loss = anchor(xs, ys) + antico(xs, ys)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        dist.barrier()
        if step:
            times.append(time.perf_counter() - start)
    rows = len(bank.weight)
    out[rank] = {
        "proxy_mib": 4 * rows * dim * 4 / 2**20,
        "peak_mib": peak_mib() - before,
        "step_s": statistics.median(times),
    }
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {available_mib() / 1024:.0f} GiB available")
    print(
        "| classes | processes | proxies | proxy memory per process (MiB) | peak RSS growth per process (MiB) | step (s) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for classes in args.classes:
        for world in args.processes:
            for shard in (False, True):
                if world == 1 and shard:
                    continue
                rows = -(-classes // world) if shard else classes
                need = world * 6 * rows * args.dim * 4 / 2**20  # the bank's four copies, and headroom
                label = "sharded" if shard else "replicated"
                if need > 0.8 * available_mib():
                    print(
                        f"| {classes:,} | {world} | {label} | {4 * rows * args.dim * 4 / 2**20:,.0f} | does not fit in this machine's memory | - |"
                    )
                    continue
                out = mp.Manager().dict()
                mp.spawn(
                    rank_main,
                    args=(world, free_port(), classes, args.dim, args.batch, args.steps, shard, out),
                    nprocs=world,
                    join=True,
                )
                worst = max(out.values(), key=lambda r: r["peak_mib"])
                step = max(r["step_s"] for r in out.values())
                print(
                    f"| {classes:,} | {world} | {label} | {worst['proxy_mib']:,.0f} | {worst['peak_mib']:,.0f} | {step:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
