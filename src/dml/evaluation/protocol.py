"""How a split is evaluated: the datamodule's description of a split, handed to the module once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dml.evaluation.collapse import COLLAPSE_METRICS
from dml.evaluation.metrics import metric_names


@dataclass(frozen=True)
class EvaluationProtocol:
    """The evaluation of one split, as its benchmark defines it.

    Attributes:
        recall_ks: the K of Recall@K.
        roles: per item of the split, 0 for a query and 1 for a gallery item (In-Shop); ``None``: every
            item queries all the others.
        extra_labels: other label sets to score the split with, by name (Omniglot's characters); their
            metrics are logged as ``<stage>/<name>/<metric>``.
        raw_image: position in the split -> its image as read, untransformed (for pictures); optional.
    """

    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    roles: torch.Tensor | None = None
    extra_labels: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_image: Callable[[int], Any] | None = None

    def metric_names(
        self, stage: str, nmi: bool, nmi_multiples: tuple[int, ...], collapse: bool
    ) -> list[str]:
        """Every metric name an evaluation of this split logs under ``stage``."""
        names = metric_names(self.recall_ks, nmi, nmi_multiples)
        out = [
            f"{stage}/{prefix}{name}"
            for prefix in ["", *(f"{k}/" for k in self.extra_labels)]
            for name in names
        ]
        return out + [f"{stage}/{name}" for name in COLLAPSE_METRICS] * collapse
