"""A weighted sum of loss terms that share one proxy bank."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dml.losses.miners import Miner
from dml.losses.proxy import ProxyBank
from dml.losses.proxy_sampling import ProxySampler


class Term(nn.Module):
    """One loss term, called as ``term(embeddings, labels)``; with a miner, it mines first."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.miner is None:
            return self.loss(embeddings, labels)
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


class CompositeLoss(nn.Module):
    """L = sum_t weight_t * term_t(embeddings, labels).

    Args:
        terms: name -> {"loss": ..., "miner": ... (optional), "weight": float}. A loss given as a partial
            constructor (Hydra ``_partial_: true``) receives whichever of ``num_classes``,
            ``embedding_size`` and ``proxies`` its constructor takes, so all proxy-based terms share one
            ``ProxyBank``.
        num_classes: number of training classes (rows of the proxy bank).
        embedding_size: embedding dimension d.
        antico_weight: unused here; a config handle interpolated into the AntiCo term's weight so that
            a sweep over it is one override (``loss.antico_weight=...``).
        proxy_init_std: initialise the proxy bank normal with this standard deviation; ``None`` keeps
            the kaiming-normal (fan_out) initialisation (see :class:`ProxyBank`).
        shard_proxies: under DDP, each process holds a slice of the proxy bank only (see
            :mod:`dml.models.sharding`); nothing on one process.
        proxy_sample_rate: below 1, each training step's proxy terms see the proxies of the batch's
            classes and this share of the others, drawn afresh (:mod:`dml.losses.proxy_sampling`); 1 sees
            them all. Evaluation always sees all.
        proxy_sample_seed: the seed of that draw.

    ``forward`` returns a dict: ``loss`` (the weighted sum) and each term's unweighted value by name.
    """

    def __init__(
        self,
        terms: Mapping[str, Mapping[str, Any]],
        num_classes: int,
        embedding_size: int,
        antico_weight: float | None = None,
        proxy_init_std: float | None = None,
        shard_proxies: bool = False,
        proxy_sample_rate: float = 1.0,
        proxy_sample_seed: int = 0,
    ):
        super().__init__()
        self.shard_proxies = shard_proxies
        if not terms:
            raise ValueError("CompositeLoss needs at least one term (loss.terms is empty)")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.proxy_init_std = proxy_init_std
        self._proxies: ProxyBank | None = None
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, spec in terms.items():
            if "loss" not in spec:
                raise ValueError(f"loss term {name!r} has no 'loss' entry; give it loss: {{_target_: ...}}")
            miner = spec.get("miner")
            self.terms[name] = Term(
                self._build(name, spec["loss"]), self._build(name, miner) if miner else None
            )
            self.weights[name] = float(spec.get("weight", 1.0))
        if self._proxies is not None and not any(
            m is self._proxies for term in self.terms.values() for m in term.modules()
        ):
            # Offered to a term that did not keep it (AntiCo's pair variant): a parameter no term uses
            # would make DDP refuse the model.
            self._proxies = None
        self.sampler = _sampler(proxy_sample_rate, proxy_sample_seed, self._proxies, list(self.terms))

    @property
    def bank(self) -> ProxyBank | None:
        """The shared proxy bank, or None when no term keeps proxies."""
        return self._proxies

    @property
    def proxies(self) -> ProxyBank:
        """The proxy bank shared by every proxy-based term (made on first use)."""
        if self._proxies is None:
            self._proxies = ProxyBank(self.num_classes, self.embedding_size, self.proxy_init_std)
        return self._proxies

    def _build(self, name: str, part: nn.Module | Callable[..., nn.Module]) -> nn.Module:
        if isinstance(part, nn.Module):
            return part
        if not callable(part):
            raise TypeError(
                f"loss term {name!r}: expected a module or a partial constructor, got {type(part).__name__}"
            )
        params = inspect.signature(part).parameters
        given = {"num_classes": self.num_classes, "embedding_size": self.embedding_size}
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if k in params}
        if "proxies" in params:
            kwargs["proxies"] = self.proxies
        return part(**kwargs)

    def param_groups(self, lr: float, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups of the loss-owned parameters: the proxy bank, then each term's own.

        A term whose loss has a ``param_lr`` or ``param_weight_decay`` attribute that is not ``None``
        (the margin loss's beta) gets that learning rate or weight decay; otherwise a group takes
        ``lr``, and ``weight_decay`` when given (else the optimizer's).
        """
        groups, seen = [], set()
        if self._proxies is not None:
            groups.append(_group("loss/proxies", [self._proxies.weight], lr, weight_decay))
            seen.add(id(self._proxies.weight))
        for name, term in self.terms.items():
            own = [p for p in term.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                term_lr = getattr(term.loss, "param_lr", None)
                term_wd = getattr(term.loss, "param_weight_decay", None)
                groups.append(
                    _group(
                        f"loss/{name}",
                        own,
                        term_lr if term_lr is not None else lr,
                        term_wd if term_wd is not None else weight_decay,
                    )
                )
        return groups

    def random_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The generator states of every miner in the loss, and the proxy sampler's draw count, by module
        name, for checkpoints."""
        return {
            name: m.generator_states()
            for name, m in self.named_modules()
            if isinstance(m, Miner | ProxySampler)
        }

    def load_random_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what :meth:`random_state` returned; miners the loss no longer has are ignored."""
        miners = dict(self.named_modules())
        for name, generators in state.items():
            if isinstance(miners.get(name), Miner | ProxySampler):
                miners[name].load_generator_states(generators)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: embeddings (B, d); labels (B,). Returns {"loss": scalar, <term>: scalar, ...}."""
        out: dict[str, torch.Tensor] = {}
        total = embeddings.new_zeros((), dtype=torch.float32)
        bank = self._proxies
        if bank is not None and self.sampler is not None and self.training:
            bank.active = self.sampler(bank, labels)  # one draw that every proxy term of the step sees
        try:
            for name, term in self.terms.items():
                value = term(embeddings, labels)
                out[name] = value.detach()
                total = total + self.weights[name] * value.float()
        finally:
            if bank is not None:
                bank.active = None
        out["loss"] = total
        return out


def _sampler(rate: float, seed: int, bank: ProxyBank | None, terms: list[str]) -> ProxySampler | None:
    if rate == 1:
        return None
    if bank is None:
        raise ValueError(
            f"loss.proxy_sample_rate={rate}, but the loss ({', '.join(terms)}) has no class proxies to "
            "sample: set loss.proxy_sample_rate=1"
        )
    return ProxySampler(rate, seed)


def _group(name: str, params: list[nn.Parameter], lr: float, weight_decay: float | None) -> dict[str, Any]:
    group = {"name": name, "params": params, "lr": lr}
    if weight_decay is not None:
        group["weight_decay"] = weight_decay
    return group
