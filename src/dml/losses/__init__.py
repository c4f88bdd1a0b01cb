"""Loss terms: each is called as ``term(embeddings, labels) -> scalar``."""

from dml.losses.coding_rate import AntiCoLoss, coding_rate
from dml.losses.composite import CompositeLoss
from dml.losses.proxy import ProxyAnchorLoss, ProxyBank

__all__ = ["AntiCoLoss", "CompositeLoss", "ProxyAnchorLoss", "ProxyBank", "coding_rate"]
