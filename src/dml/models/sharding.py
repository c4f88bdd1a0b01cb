"""The loss's class proxies sharded across DDP ranks (``loss.shard_proxies=true``; the math is in
:mod:`dml.losses.sharded`): each rank keeps its slice of the bank and the optimizer state of that slice
only, DDP leaves the slice alone (its gradient is exact on its rank, not an average), and checkpoints hold
the whole bank and its whole optimizer state, so that a run loads on any number of processes: resumed on
3 ranks after 2, or evaluated in one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from dml.errors import UserError
from dml.log import get_logger
from dml.losses.proxy import ProxyBank
from dml.losses.sharded import shard_bounds

log = get_logger(__name__)

BANK_GROUP = "loss/proxies"  # the optimizer group of the bank (CompositeLoss.param_groups)


def shard_proxies(module: L.LightningModule, world: int, rank: int) -> None:
    """Shard ``module.loss``'s proxy bank over ``world`` ranks (nothing on one), before DDP wraps the module.

    Raises:
        UserError: the loss has no proxies, there are fewer classes than ranks, or gradients are clipped
            by their norm (a norm over each rank's slice would differ between ranks).
    """
    bank = getattr(module.loss, "bank", None)
    if bank is None:
        terms = getattr(module.loss, "terms", {})
        raise UserError(
            f"loss.shard_proxies=true, but the loss ({', '.join(terms)}) has no class proxies to "
            "shard: set loss.shard_proxies=false"
        )
    if world == 1 or bank.sharded:
        return
    if world > bank.total:
        raise UserError(
            f"loss.shard_proxies=true over {world} processes needs at least {world} classes; the loss has "
            f"{bank.total}: set loss.shard_proxies=false"
        )
    trainer = module.trainer
    if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "norm":
        raise UserError(
            "loss.shard_proxies=true with trainer.gradient_clip_algorithm=norm: each process would clip by the "
            "norm of its own slice of the proxies; clip by value (trainer.gradient_clip_algorithm=value) or "
            "set loss.shard_proxies=false"
        )
    bank.shard(world, rank)
    log.info(
        "process %d holds class proxies %d to %d of %d",
        rank,
        bank.offset,
        bank.offset + len(bank.weight) - 1,
        bank.total,
    )
    module._ddp_params_and_buffers_to_ignore = _bank_names(module, bank)  # type: ignore[assignment]


def _bank_names(module: torch.nn.Module, bank: ProxyBank) -> list[str]:
    """Every name the bank's weight goes by in ``module`` (each proxy term holds the shared bank)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules(remove_duplicate=False)
        for name, p in sub.named_parameters(recurse=False)
        if p is bank.weight
    ]


def whole_bank_into(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put the whole bank, and the optimizer state of the whole bank, into ``checkpoint`` (every rank
    calls it, in ``on_save_checkpoint``; rank 0 writes the file)."""
    bank = getattr(module.loss, "bank", None)
    if bank is None or not bank.sharded:
        return
    whole = _gather_rows(bank.weight.detach(), bank.total)
    for name in _bank_names(module, bank):
        checkpoint["state_dict"][name] = whole
    for entry in _bank_states(checkpoint):
        for key, value in sorted(entry.items()):
            if isinstance(value, torch.Tensor) and value.ndim and len(value) == len(bank.weight):
                entry[key] = _gather_rows(value, bank.total)


def bank_slice_from(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Cut this rank's slice of the bank, and of its optimizer state, out of a checkpoint holding the whole
    (``on_load_checkpoint``, before Lightning loads it)."""
    bank = getattr(module.loss, "bank", None)
    if bank is None or not bank.sharded:
        return
    rows = slice(bank.offset, bank.offset + len(bank.weight))
    for name in _bank_names(module, bank):
        value = checkpoint["state_dict"].get(name)
        if value is not None and len(value) == bank.total:
            checkpoint["state_dict"][name] = value[rows]
    for entry in _bank_states(checkpoint):
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and len(value) == bank.total:
                entry[key] = value[rows]


def _bank_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer state entries of the bank's parameter, in each optimizer of the checkpoint."""
    out = []
    for optimizer in checkpoint.get("optimizer_states", []):
        for group in optimizer.get("param_groups", []):
            if group.get("name") == BANK_GROUP:
                out += [optimizer["state"][i] for i in group["params"] if i in optimizer.get("state", {})]
    return out


def _gather_rows(part: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows of a sharded tensor, in class order (the ranks hold different numbers of rows)."""
    world = dist.get_world_size()
    sizes = [hi - lo for lo, hi in (shard_bounds(total, world, r) for r in range(world))]
    padded = part.new_zeros((max(sizes), *part.shape[1:]))
    padded[: len(part)] = part
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)])
