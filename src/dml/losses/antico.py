"""The Anti-Collapse (AntiCo) loss, built on the coding rate of :mod:`dml.functional`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dml.functional import Scale, coding_rate, once_each, weighted_coding_rate
from dml.losses import sharded
from dml.losses.proxy import ProxyBank


class AntiCoLoss(nn.Module):
    """Anti-Collapse loss: rewards a high coding rate of the batch embeddings or of the class proxies.

    Variants (DESIGN §2): ``pair`` takes the batch embeddings; ``batch_proxy`` the L2-normalised proxies of
    the classes present in the batch (the official default); ``all_proxy`` all proxies. The proxy variants
    touch only the proxies. ``form='exp'`` returns exp(-gamma R) as the official code does; ``form='neg'``
    returns -gamma R. ``scale=None`` picks each variant's standard: MCR^2's d/(n eps) for ``pair``, the
    official n/(d eps) for the proxy variants. ``scale_free=True`` (``pair`` only) divides the batch by its
    root-mean-square norm before the rate, so that R measures how evenly the batch fills the space and not
    how large it is: un-normalised embeddings (the plane) cannot raise it by growing. On unit-norm
    embeddings it changes nothing.
    """

    variants = ("pair", "batch_proxy", "all_proxy")

    def __init__(
        self,
        variant: Literal["pair", "batch_proxy", "all_proxy"] = "batch_proxy",
        eps: float = 0.5,
        gamma: float = 1.0,
        scale: Scale | None = None,
        form: Literal["exp", "neg"] = "exp",
        scale_free: bool = False,
        proxies: ProxyBank | None = None,
        num_classes: int | None = None,
        embedding_size: int | None = None,
    ):
        super().__init__()
        if variant not in self.variants:
            raise ValueError(f"AntiCo variant must be one of {self.variants}, got {variant!r}")
        if form not in ("exp", "neg"):
            raise ValueError(f"AntiCo form must be 'exp' or 'neg', got {form!r}")
        if scale not in (None, "official", "mcr2"):
            raise ValueError(f"AntiCo scale must be 'official', 'mcr2' or null, got {scale!r}")
        if scale_free and variant != "pair":
            raise ValueError(
                f"AntiCo scale_free applies to the pair variant (the proxies are unit vectors already), not {variant!r}"
            )
        self.variant, self.eps, self.gamma, self.form, self.scale_free = variant, eps, gamma, form, scale_free
        self.scale: Scale = scale or ("mcr2" if variant == "pair" else "official")
        owner = f"AntiCo variant {variant!r}"
        self.proxies = (
            None if variant == "pair" else ProxyBank.resolve(proxies, num_classes, embedding_size, owner)
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: embeddings (B, d); labels (B,) class indices (unused by ``pair``). Returns a scalar."""
        if self.variant == "pair":
            if self.scale_free:  # rows of mean squared norm 1 (a floor keeps an all-zero batch finite)
                embeddings = embeddings / embeddings.float().pow(2).sum(1).mean().clamp_min(1e-12).sqrt()
            rate = coding_rate(embeddings, eps=self.eps, scale=self.scale)
        elif self.proxies is not None and self.variant == "batch_proxy" and self.proxies.sharded:
            rate = sharded.batch_proxy_coding_rate(self.proxies, labels, self.eps, self.scale)
        elif self.proxies is not None and self.variant == "all_proxy" and self.proxies.partial:
            rate = sharded.proxy_coding_rate(self.proxies.seen(), self.eps, self.scale)  # sharded or sampled
        elif self.variant == "batch_proxy":
            assert self.proxies is not None  # every variant but pair has a bank
            # the batch's proxies, each class once: weights 1/count, not unique() (the host would wait)
            rate = weighted_coding_rate(
                self.proxies.normalized(labels), once_each(labels), self.eps, self.scale
            )
        else:
            assert self.proxies is not None
            rate = coding_rate(self.proxies.normalized(), eps=self.eps, scale=self.scale)
        return torch.exp(-self.gamma * rate) if self.form == "exp" else -self.gamma * rate
