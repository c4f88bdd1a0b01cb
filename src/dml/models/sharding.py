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
    if str(getattr(trainer, "precision", "")) == "16-mixed":  # bf16-mixed has no loss scaling: allowed
        raise UserError(
            "loss.shard_proxies=true with trainer.precision=16-mixed: each process would decide alone whether "
            "its gradients overflowed and skip its step alone; use bf16-mixed or 32-true"
        )
    if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "norm":
        raise UserError(
            "loss.shard_proxies=true with trainer.gradient_clip_algorithm=norm: each process would clip by the "
            "norm of its own slice of the proxies; clip by value (trainer.gradient_clip_algorithm=value) or "
            "set loss.shard_proxies=false"
        )
    bank.shard(world, rank)
    sampler = getattr(module.loss, "sampler", None)
    if sampler is not None:
        sampler.for_rank(rank)  # each rank samples its own slice: streams of their own
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
    calls it, in ``on_save_checkpoint``; rank 0, which writes the file, receives them on the CPU, one
    tensor at a time). The optimizer's live state is left as it is: the checkpoint gets new entries."""
    bank = getattr(module.loss, "bank", None)
    if bank is None or not bank.sharded:
        return
    whole = _gather_rows(bank.weight.detach(), bank.total)
    if whole is not None:
        for name in _bank_names(module, bank):
            checkpoint["state_dict"][name] = whole
    for state, index in _bank_states(checkpoint):
        entry = dict(state[index])  # a copy: optimizer.state_dict() hands over the live state by reference
        for key, value in sorted(entry.items()):
            if isinstance(value, torch.Tensor) and value.shape == bank.weight.shape:
                gathered = _gather_rows(value, bank.total)
                entry[key] = gathered if gathered is not None else value
        state[index] = entry


def loaded_from(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Prepare a checkpoint read mapped (``on_load_checkpoint``, before Lightning loads it): cut this rank's
    slice of a whole bank, and of its optimizer state, and copy the optimizer state into this process's
    own memory (loading it on the CPU would otherwise keep views of the file: a file rewritten in place
    would change them)."""
    bank = getattr(module.loss, "bank", None)
    if bank is not None and bank.sharded:
        _cut_slice(bank, _bank_names(module, bank), checkpoint)
    for optimizer in checkpoint.get("optimizer_states", []):
        for entry in optimizer.get("state", {}).values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    entry[key] = value.clone()


def _cut_slice(bank: ProxyBank, names: list[str], checkpoint: dict[str, Any]) -> None:
    rows = slice(bank.offset, bank.offset + len(bank.weight))
    whole_shape = (bank.total, *bank.weight.shape[1:])
    for name in names:
        value = checkpoint["state_dict"].get(name)
        if value is not None and value.shape == whole_shape:
            checkpoint["state_dict"][name] = value[rows]
    for state, index in _bank_states(checkpoint):
        state[index] = {
            key: value[rows] if isinstance(value, torch.Tensor) and value.shape == whole_shape else value
            for key, value in state[index].items()
        }


def _bank_states(checkpoint: dict[str, Any]) -> list[tuple[dict[int, Any], int]]:
    """(an optimizer's state, the index of the bank's parameter in it), for each optimizer holding it."""
    out = []
    for optimizer in checkpoint.get("optimizer_states", []):
        state = optimizer.get("state", {})
        for group in optimizer.get("param_groups", []):
            if group.get("name") == BANK_GROUP:
                out += [(state, i) for i in group["params"] if i in state]
    return out


GATHER_ROWS = 1 << 16  # rows a process sends at a time when a checkpoint gathers the bank


def _gather_rows(part: torch.Tensor, total: int, rows: int = GATHER_ROWS) -> torch.Tensor | None:
    """Every rank's rows of a sharded tensor in class order, on rank 0's CPU (None on the other ranks,
    which only send theirs). ``rows`` at a time from each rank: rank 0's device holds ``world * rows``
    rows at once, never the whole bank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = [shard_bounds(total, world, r) for r in range(world)]
    most = max(hi - lo for lo, hi in bounds)
    whole = torch.empty((total, *part.shape[1:]), dtype=part.dtype) if rank == 0 else None
    for start in range(0, most, rows):
        piece = part.new_zeros((min(rows, most - start), *part.shape[1:]))
        mine = part[start : start + len(piece)]
        piece[: len(mine)] = mine
        pieces = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, pieces, dst=0)
        if whole is not None and pieces is not None:
            for (lo, hi), got in zip(bounds, pieces, strict=True):
                n = max(0, min(hi - lo - start, len(piece)))
                whole[lo + start : lo + start + n] = got[:n].cpu()
    return whole
