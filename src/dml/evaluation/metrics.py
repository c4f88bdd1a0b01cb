"""The metrics of an evaluated split: retrieval scores and clustering NMI, under one set of names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dml.evaluation.backends import Backend, Metric
from dml.evaluation.clustering import nmi_score
from dml.evaluation.retrieval import retrieval_scores


def metric_names(ks: Sequence[int], nmi: bool = True, nmi_multiples: Sequence[int] = ()) -> list[str]:
    """The keys :func:`retrieval_metrics` returns for these options."""
    return [
        *(f"recall@{k}" for k in ks),
        "map@r",
        "r_precision",
        *(["nmi"] if nmi else []),
        *(f"nmi+{m}x" for m in nmi_multiples),
    ]


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    backend: Backend = "auto",
    metric: Metric = "cosine",
    nmi: bool = True,
    nmi_multiples: Sequence[int] = (),
    seed: int = 0,
) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (:func:`~dml.evaluation.retrieval.retrieval_scores`) and NMI.

    Args:
        embeddings, labels, ks, reference, reference_labels, backend, metric: see ``retrieval_scores``.
        nmi: cluster the query embeddings with k-means (k = number of classes) and report NMI.
        nmi_multiples: also report NMI+ (EPS paper) with k = m x the number of classes, as ``nmi+{m}x``.
        seed: k-means seed, so that evaluation is repeatable.

    Returns:
        {"recall@K": ..., "map@r": ..., "r_precision": ..., "nmi": ..., "nmi+10x": ...} as floats in
        [0, 1], named as :func:`metric_names` lists them.
    """
    out = retrieval_scores(embeddings, labels, ks, reference, reference_labels, backend, metric)
    num_classes = int(torch.unique(labels).numel())
    if nmi:
        out["nmi"] = nmi_score(embeddings, labels, seed=seed)
    for m in nmi_multiples:
        out[f"nmi+{m}x"] = nmi_score(embeddings, labels, num_clusters=m * num_classes, seed=seed)
    return out
