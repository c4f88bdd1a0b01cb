"""How a split is evaluated: the datamodule's description of a split, handed to the module once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dml.evaluation.collapse import COLLAPSE_METRICS, collapse_metrics
from dml.evaluation.metrics import metric_names, retrieval_metrics


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

    def score(
        self,
        stage: str,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        collapse: bool = True,
        **options: Any,
    ) -> dict[str, float]:
        """The metrics of the split's ``embeddings`` (one per item, at ``positions`` in the split), named
        ``<stage>/...``: retrieval by each label set (queries against the gallery where the split has
        roles), and the collapse measures. ``options``: of :func:`~dml.evaluation.retrieval_metrics`."""
        label_sets = {"": labels} | {
            f"{name}/": extra.to(positions.device)[positions] for name, extra in self.extra_labels.items()
        }
        roles = self.roles.to(positions.device)[positions] if self.roles is not None else None
        options = {"ks": self.recall_ks, **options}
        metrics: dict[str, float] = {}
        for prefix, set_labels in label_sets.items():
            if roles is None:
                values = retrieval_metrics(embeddings, set_labels, **options)
            else:  # query/gallery protocol: queries search the gallery only
                query, gallery = roles == 0, roles == 1
                values = retrieval_metrics(
                    embeddings[query],
                    set_labels[query],
                    reference=embeddings[gallery],
                    reference_labels=set_labels[gallery],
                    **options,
                )
            metrics |= {f"{stage}/{prefix}{k}": v for k, v in values.items()}
        if collapse:
            metrics |= {f"{stage}/{k}": v for k, v in collapse_metrics(embeddings, labels).items()}
        return metrics
