"""Run by tests/test_ddp.py in its own interpreter, on 2 gloo ranks: DMLModule's checkpoint hooks keep
each rank's random state. Each rank advances its random miner and its torch RNG by a different amount,
saves (every rank builds the checkpoint, as Lightning does), and a fresh module on each rank loads
rank 0's checkpoint dict (the one file a resume reads); each rank must get back its own state.
Exits non-zero, naming the rank whose state was not restored."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dml.losses import CompositeLoss, RandomTripletMiner, TripletLoss
from dml.models import DMLModule, LinearHead, SmallCNN

WORLD = 2


def make_module(rank: int) -> DMLModule:
    loss = CompositeLoss(
        {"triplet": {"loss": TripletLoss(), "miner": RandomTripletMiner(seed=3)}},
        num_classes=4,
        embedding_size=8,
    )
    backbone = SmallCNN(width=4)
    module = DMLModule(backbone, LinearHead(backbone.num_features, 8), loss, torch.optim.SGD)
    module._trainer = SimpleNamespace(world_size=WORLD, global_rank=rank)  # what the hooks read of it
    return module


def miner_generator(module: DMLModule) -> torch.Generator:
    return module.loss.terms["triplet"].miner.generator(torch.device("cpu"))


def rank_main(rank: int, port: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    module = make_module(rank)
    torch.rand(rank + 1, generator=miner_generator(module))  # the ranks' states now differ
    torch.rand(3 * rank + 1)
    expected = (miner_generator(module).get_state(), torch.get_rng_state())
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    written = [checkpoint if rank == 0 else None]
    dist.broadcast_object_list(written, src=0)  # every rank resumes from the file rank 0 wrote
    torch.manual_seed(1234)
    resumed = make_module(rank)
    resumed.on_load_checkpoint(written[0])
    got = (miner_generator(resumed).get_state(), torch.get_rng_state())
    out[rank] = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    dist.destroy_process_group()


def main(port: str) -> None:
    out = mp.Manager().dict()
    mp.spawn(rank_main, args=(port, out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        print(f"rank {rank}: miner and torch random state restored {'ok' if out[rank] else 'DIFFERS'}")
    failed = [rank for rank in range(WORLD) if not out[rank]]
    if failed:
        sys.exit(f"ranks {failed} resumed with another rank's random state")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "29811")
