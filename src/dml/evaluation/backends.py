"""The nearest-neighbour backends of the evaluation: a blocked torch scan, or a faiss index."""

from __future__ import annotations

import logging
from typing import Literal

Backend = Literal["auto", "torch", "faiss"]
KNN_BACKENDS = ("auto", "torch", "faiss")
Metric = Literal["cosine", "euclidean"]
METRICS = ("cosine", "euclidean")  # unit-norm embeddings, or embeddings left as they are


def faiss_available() -> bool:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports every CPU-feature probe at INFO
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
