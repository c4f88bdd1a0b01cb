"""Clustering quality of embeddings: NMI between k-means clusters and class labels."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from dml.evaluation.backends import faiss_available


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
    x = np.ascontiguousarray(embeddings.detach().float().cpu().numpy())
    y = labels.cpu().numpy()
    k = num_clusters or len(set(y.tolist()))
    k = min(k, x.shape[0])
    if k * x.shape[0] > _SKLEARN_LIMIT and faiss_available():
        clusters = _faiss_kmeans(x, k, seed)
    else:
        clusters = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))


# Above this many (points x clusters), e.g. SOP's 60k points in 11k clusters, k-means runs in faiss.
_SKLEARN_LIMIT = 50_000_000


def _faiss_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False, max_points_per_centroid=256)
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return assignment.ravel()
