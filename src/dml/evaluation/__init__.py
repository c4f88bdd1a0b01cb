"""Evaluation of embeddings: retrieval, clustering and collapse measures, and pictures of them."""

from dml.evaluation.clustering import nmi_score
from dml.evaluation.collapse import (
    collapse_metrics,
    distance_ratio,
    effective_rank,
    mean_class_coding_rate,
    singular_values,
)
from dml.evaluation.metrics import metric_names, retrieval_metrics
from dml.evaluation.retrieval import knn, map_at_r, recall_at_k, retrieval_scores

__all__ = [
    "collapse_metrics",
    "distance_ratio",
    "effective_rank",
    "knn",
    "map_at_r",
    "mean_class_coding_rate",
    "metric_names",
    "nmi_score",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_scores",
    "singular_values",
]
