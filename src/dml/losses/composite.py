"""A weighted sum of loss terms that share one proxy bank."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dml.losses.proxy import ProxyBank


class CompositeLoss(nn.Module):
    """L = sum_t weight_t * term_t(embeddings, labels).

    Args:
        terms: name -> {"loss": a loss module or a partial constructor, "weight": float}. A partial
            (Hydra ``_partial_: true``) receives whichever of ``num_classes``, ``embedding_size`` and
            ``proxies`` its constructor takes, so all proxy-based terms share one ``ProxyBank``.
        num_classes: number of training classes (rows of the proxy bank).
        embedding_size: embedding dimension d.
        antico_weight: unused here; a config handle interpolated into the AntiCo term's weight so that
            a sweep over it is one override (``loss.antico_weight=...``).

    ``forward`` returns a dict: ``loss`` (the weighted sum) and each term's unweighted value by name.
    """

    def __init__(
        self,
        terms: Mapping[str, Mapping[str, Any]],
        num_classes: int,
        embedding_size: int,
        antico_weight: float | None = None,
    ):
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term (loss.terms is empty)")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self._proxies: ProxyBank | None = None
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, spec in terms.items():
            if "loss" not in spec:
                raise ValueError(f"loss term {name!r} has no 'loss' entry; give it loss: {{_target_: ...}}")
            self.terms[name] = self._build(name, spec["loss"])
            self.weights[name] = float(spec.get("weight", 1.0))

    @property
    def proxies(self) -> ProxyBank:
        if self._proxies is None:
            self._proxies = ProxyBank(self.num_classes, self.embedding_size)
        return self._proxies

    def _build(self, name: str, loss: nn.Module | Callable[..., nn.Module]) -> nn.Module:
        if isinstance(loss, nn.Module):
            return loss
        if not callable(loss):
            raise TypeError(
                f"loss term {name!r}: expected a module or a partial constructor, got {type(loss).__name__}"
            )
        params = inspect.signature(loss).parameters
        given = {"num_classes": self.num_classes, "embedding_size": self.embedding_size}
        kwargs = {k: v for k, v in given.items() if k in params}
        if "proxies" in params:
            kwargs["proxies"] = self.proxies
        return loss(**kwargs)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: embeddings (B, d); labels (B,). Returns {"loss": scalar, <term>: scalar, ...}."""
        out: dict[str, torch.Tensor] = {}
        total = embeddings.new_zeros((), dtype=torch.float32)
        for name, term in self.terms.items():
            value = term(embeddings, labels)
            out[name] = value.detach()
            total = total + self.weights[name] * value.float()
        out["loss"] = total
        return out
