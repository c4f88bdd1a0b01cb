"""Evaluation of embeddings: retrieval and clustering metrics."""

from dml.evaluation.clustering import nmi_score
from dml.evaluation.retrieval import knn, map_at_r, recall_at_k, retrieval_metrics

__all__ = ["knn", "map_at_r", "nmi_score", "recall_at_k", "retrieval_metrics"]
