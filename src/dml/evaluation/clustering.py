"""Clustering quality of embeddings: NMI between k-means clusters and class labels."""

from __future__ import annotations

import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score


def nmi_score(
    embeddings: torch.Tensor, labels: torch.Tensor, num_clusters: int | None = None, seed: int = 0
) -> float:
    """NMI of k-means clusters against ``labels``.

    Args:
        embeddings: (n, d).
        labels: (n,).
        num_clusters: k of k-means; the number of classes when ``None``. A multiple of it gives the
            EPS paper's NMI+.
        seed: k-means seed; a fixed seed makes the score repeatable.
    """
    x = embeddings.detach().float().cpu().numpy()
    y = labels.cpu().numpy()
    k = num_clusters or len(set(y.tolist()))
    k = min(k, x.shape[0])
    clusters = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))
