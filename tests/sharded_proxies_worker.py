"""Run by tests/test_sharded_proxies.py in its own interpreter: on WORLD gloo ranks (argument 1; port:
argument 2), every proxy term with its bank sharded gives, in float64, the loss, the gradients to every
embedding and every proxy, and the proxies after one optimizer step of one process holding the whole bank
on the same global batch: with the batch split evenly over the ranks, and unevenly (each rank a different
number of items, which gather_batch pads and cuts). Prints "<term> ok" and "<term> uneven ok" per term on
rank 0, or what differs. Then, with negative proxies sampled (each rank drawing from its slice), the
terms over the sampled proxies of every rank equal one process holding just those: "<term> sampled ok".
Last, the bank gathered for a checkpoint a few rows at a time: "gathered in pieces ok"."""

from __future__ import annotations

import gc
import itertools
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dml.losses import AntiCoLoss, ProxyAnchorLoss, ProxyNCALoss
from dml.losses.distributed import gather_batch
from dml.losses.proxy import ProxyBank
from dml.losses.proxy_sampling import ProxySampler
from dml.losses.sharded import shard_bounds
from dml.models.sharding import _gather_rows

B, D, C = 24, 8, 10
TOLERANCE = 1e-10


def terms() -> dict[str, Callable[[ProxyBank], Callable]]:
    """Each term as a function of the (shared) bank."""

    def composite(bank: ProxyBank) -> Callable:
        anchor, antico = ProxyAnchorLoss(proxies=bank), AntiCoLoss("batch_proxy", gamma=1.0, proxies=bank)
        return lambda x, y: anchor(x, y) + 0.5 * antico(x, y)

    return {
        "proxy_anchor": lambda bank: ProxyAnchorLoss(proxies=bank),
        "proxy_nca": lambda bank: ProxyNCALoss(proxies=bank),
        "proxy_nca_exclude_positive": lambda bank: ProxyNCALoss(proxies=bank, exclude_positive=True),
        "antico_all_proxy": lambda bank: AntiCoLoss("all_proxy", proxies=bank),
        "antico_batch_proxy": lambda bank: AntiCoLoss("batch_proxy", proxies=bank),
        "antico_batch_proxy_mcr2_neg": lambda bank: AntiCoLoss(
            "batch_proxy", scale="mcr2", form="neg", proxies=bank
        ),
        "proxy_anchor_plus_antico": composite,
    }


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4, 5, 5, 7, 7, 8, 8, 9, 9, 1, 1, 4, 4, 7, 7, 0, 0])
    return torch.randn(B, D, generator=g, dtype=torch.float64), labels


def bank() -> ProxyBank:
    torch.manual_seed(5)
    return ProxyBank(C, D).double()


def one_step(term: Callable, x: torch.Tensor, y: torch.Tensor, proxies: ProxyBank) -> dict[str, torch.Tensor]:
    loss = term(F.normalize(x, dim=1), y)
    loss.backward()
    optimizer = torch.optim.SGD(proxies.parameters(), lr=0.5)
    grad = proxies.weight.grad.clone()
    optimizer.step()
    return {
        "loss": loss.detach(),
        "x_grad": x.grad.clone() if x.grad is not None else torch.zeros_like(x),  # AntiCo: proxies only
        "proxy_grad": grad,
        "proxies": proxies.weight.detach().clone(),
    }


SAMPLED = (
    "proxy_anchor",
    "proxy_nca",
    "proxy_nca_exclude_positive",
    "antico_all_proxy",
    "proxy_anchor_plus_antico",
)


def sampled_step(
    make: Callable, part: ProxyBank, sampler: ProxySampler, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One step of a term on ``part`` (its rank's items ``x``, ``y``) over the proxies ``sampler`` draws;
    and the classes this rank's draw made active."""
    loss_of, drawn = make(part), []

    def sampled(x_local: torch.Tensor, y_local: torch.Tensor) -> torch.Tensor:
        x_all, y_all = gather_batch(x_local, y_local)
        part.active = sampler(part, y_all)
        drawn.append(part.active)
        try:
            return loss_of(x_all, y_all)
        finally:
            part.active = None

    got = one_step(sampled, x.clone().requires_grad_(), y, part)
    return got, drawn[0].classes[drawn[0].weights > 0].tolist()


def on_these_classes(
    make: Callable, classes: list[int], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One step of a term for one process holding only the proxies of ``classes`` (sorted), written back
    into the whole bank's shape: the gradient 0 and the proxies unchanged elsewhere."""
    whole = bank()
    only = ProxyBank(len(classes), D).double()
    with torch.no_grad():
        only.weight.copy_(whole.weight[classes])
    step = one_step(
        make(only), x.clone().requires_grad_(), torch.searchsorted(torch.tensor(classes), y), only
    )
    grad, after = torch.zeros_like(whole.weight), whole.weight.detach().clone()
    grad[classes], after[classes] = step["proxy_grad"], step["proxies"]
    return step | {"proxy_grad": grad, "proxies": after}


def rank_main(rank: int, world: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_default_dtype(torch.float64)
    x, y = data()
    lo, hi = shard_bounds(C, world, rank)
    uneven = {2: [0, 9, B], 3: [0, 5, 14, B]}[world]  # each rank's own count
    layouts = {
        "": slice(rank * B // world, (rank + 1) * B // world),
        " uneven": slice(uneven[rank], uneven[rank + 1]),
    }
    report = []
    for (layout, chunk), (name, make) in itertools.product(layouts.items(), terms().items()):
        whole = bank()
        expected = one_step(make(whole), x.clone().requires_grad_(), y, whole)
        part = bank()
        part.shard(world, rank)
        mine = x[chunk].clone().requires_grad_()
        loss_of = make(part)

        def gathered(
            x_local: torch.Tensor, y_local: torch.Tensor, loss_of: Callable = loss_of
        ) -> torch.Tensor:
            return loss_of(*gather_batch(x_local, y_local))

        got = one_step(gathered, mine, y[chunk], part)
        errors = {
            "loss": (got["loss"] - expected["loss"]).abs().max().item(),
            "embedding gradients": (got["x_grad"] - expected["x_grad"][chunk]).abs().max().item(),
            "proxy gradients": (got["proxy_grad"] - expected["proxy_grad"][lo:hi]).abs().max().item(),
            "proxies after a step": (got["proxies"] - expected["proxies"][lo:hi]).abs().max().item(),
        }
        report.append((name + layout, rank, errors))
    chunk, few = layouts[""], y % 4  # four classes in the batch: most proxies are there to be sampled or not
    for name in SAMPLED:
        part = bank()
        part.shard(world, rank)
        sampler = ProxySampler(0.3, seed=11)
        sampler.for_rank(rank)
        got, mine = sampled_step(terms()[name], part, sampler, x[chunk], few[chunk])
        drawn: list = [None] * world
        dist.all_gather_object(drawn, mine)
        seen = sorted(set().union(*drawn))
        assert {0, 1, 2, 3} <= set(seen) and len(seen) < C, seen  # the positives, and not every class
        expected = on_these_classes(terms()[name], seen, x, few)
        errors = {
            "loss": (got["loss"] - expected["loss"]).abs().max().item(),
            "embedding gradients": (got["x_grad"] - expected["x_grad"][chunk]).abs().max().item(),
            "proxy gradients": (got["proxy_grad"] - expected["proxy_grad"][lo:hi]).abs().max().item(),
            "proxies after a step": (got["proxies"] - expected["proxies"][lo:hi]).abs().max().item(),
        }
        report.append((f"{name} sampled", rank, errors))
    part = bank()
    part.shard(world, rank)
    whole = _gather_rows(part.weight.detach(), C, rows=2)  # a checkpoint's bank, two rows a rank at a time
    error = 0.0 if whole is None else (whole - bank().weight.detach()).abs().max().item()
    report.append(("gathered in pieces", rank, {"bank": error}))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, report)
    if rank == 0:
        for i, name in enumerate(line for line, _, _ in everyone[0]):
            worst = {k: max(r[i][2][k] for r in everyone) for k in everyone[0][i][2]}
            bad = {k: v for k, v in worst.items() if not v <= TOLERANCE}
            print(f"{name} ok" if not bad else f"{name} differs on {world} ranks: {bad}", flush=True)
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    world, port = int(sys.argv[1]), sys.argv[2]
    mp.spawn(rank_main, args=(world, port), nprocs=world, join=True)
