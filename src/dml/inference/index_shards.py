"""An index built from a folder of embedding shards without holding every float32 vector at once: the
approximate kinds trained on a sample, the vectors added shard by shard, and the recall against exact
search measured on sampled rows, with the exact neighbours found shard by shard too.

``ivfpq`` (faiss's ``IndexIVFPQ``) stores each vector as ``pq_m`` bytes (8 bits a sub-quantizer) in its
IVF cell: a 512-d float32 vector of 2,048 bytes becomes 64, which is what lets a catalogue of 10^7 images
be searched from memory. On a machine where faiss has a GPU, the cells and codes are trained there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dml.errors import UserError, whole_number
from dml.inference.index import INDEX_FORMAT, Index, _faiss, to_gpu
from dml.inference.shards import ShardedEmbeddings
from dml.log import get_logger

log = get_logger(__name__)

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
PER_CELL = 39  # faiss's k-means wants about 39 training vectors a centroid
PQ_CENTROIDS = 256  # 8 bits a sub-quantizer
CHUNK = 32_768  # gallery rows scored at a time when the exact neighbours are found


def build_from_shards(
    shards: ShardedEmbeddings,
    kind: str = "ivfpq",
    nlist: int | None = None,
    nprobe: int = 16,
    pq_m: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    train_size: int | None = None,
    recall_queries: int = 1000,
    recall_k: int = 10,
    seed: int = 0,
) -> Index:
    """The ``kind`` index of every vector of ``shards``, and its Recall@``recall_k`` against exact search
    on ``recall_queries`` rows of the index (each query's own row left out of both answers) for the
    approximate kinds.

    ``nlist`` defaults to 4 sqrt(N) cells (at most one per 39 training vectors); ``pq_m`` to one byte per
    8 dimensions; the training sample (``train_size``) to 39 vectors a cell, and at least 39 x 256 for the
    sub-quantizers' 256 centroids, drawn at random over all the shards.

    Raises:
        UserError: an unknown kind, a setting that is not a whole number, ``pq_m`` that does not divide
            the dimension, or too few vectors to train the cells.
    """
    faiss = _faiss()
    if kind not in KINDS:
        raise UserError(f"kind={kind!r} must be one of {', '.join(KINDS)}")
    for key, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
        whole_number(value, key)
    for key, value in (("recall_queries", recall_queries), ("recall_k", recall_k)):
        whole_number(value, key)
    n, d = len(shards), shards.dim
    inner = shards.manifest.metric == "cosine"
    metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    params: dict[str, Any] = {}
    if kind in ("ivf", "ivfpq"):
        fitting = max(1, n // PER_CELL)
        nlist = min(max(1, int(4 * math.sqrt(n))), fitting) if nlist is None else whole_number(nlist, "nlist")
        if nlist > fitting:
            raise UserError(
                f"nlist={nlist}: {n} embeddings train {fitting} IVF cells at most (faiss wants about {PER_CELL} "
                f"a cell); give nlist={fitting} or less"
            )
        params = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
    if kind == "ivfpq":
        pq_m = pq_m if pq_m is not None else max(1, d // 8)
        whole_number(pq_m, "pq_m")
        if d % pq_m:
            raise UserError(
                f"pq_m={pq_m} must divide the embedding size {d} (each sub-quantizer codes d / pq_m dimensions)"
            )
        params["pq_m"] = pq_m
        if n < PQ_CENTROIDS:
            raise UserError(
                f"kind=ivfpq over {n} embeddings: its sub-quantizers train {PQ_CENTROIDS} centroids each and need "
                f"{PQ_CENTROIDS} embeddings at least (about {PER_CELL * PQ_CENTROIDS} to train well); use kind=flat, "
                "exact and fast at this size"
            )
    if kind == "hnsw":
        params = {"hnsw_m": hnsw_m, "ef_search": ef_search}

    index = _new(faiss, kind, d, metric, inner, params)
    order = np.random.default_rng(seed).permutation(n)  # the training sample first, then the recall queries
    size = 0
    if kind in ("ivf", "ivfpq"):
        wanted = PER_CELL * max(nlist or 1, PQ_CENTROIDS if kind == "ivfpq" else 1)
        size = min(n, whole_number(train_size, "train_size") if train_size is not None else wanted)
        if size < (nlist or 1):
            raise UserError(
                f"train_size={size} cannot train {nlist} IVF cells; give train_size={PER_CELL * (nlist or 1)} or more"
            )
        index = _trained(faiss, index, _rows(shards, np.sort(order[:size])))
    for vectors in shards.vectors():
        index.add(np.ascontiguousarray(vectors.float().numpy()))
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    log.info("%s index of %d %d-d embeddings built from %d shard(s)", kind, n, d, shards.manifest.shards)

    names, labels = shards.names_and_labels()
    meta = {
        "format": INDEX_FORMAT,
        "kind": kind,
        "params": params,
        "metric": shards.manifest.metric,
        "dim": d,
        "names": names,
        "labels": labels.tolist(),
        "checkpoint": shards.manifest.checkpoint,
        "checkpoint_sha256": shards.manifest.checkpoint_sha256,
        "recall_vs_exact": None,
    }
    built = Index(index, meta)
    if kind != "flat" and n > 1:
        queries = min(recall_queries, n)
        rows = order[size : size + queries] if n - size >= queries else order[-queries:]  # not trained on
        meta["recall_vs_exact"] = _recall(built, shards, np.sort(rows), min(recall_k, n - 1), inner)
    return built


def _new(faiss: Any, kind: str, d: int, metric: Any, inner: bool, params: dict[str, Any]) -> Any:
    if kind == "flat":
        return faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], metric)
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], 8, metric)
    return index  # faiss's Python wrapper keeps the quantizer alive with it


def _trained(faiss: Any, index: Any, sample: np.ndarray) -> Any:
    """``index`` trained on ``sample``: on a GPU where faiss has one (the index comes back to the CPU)."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        gpu = to_gpu(faiss, index)  # says so, and stays on the CPU, where faiss's GPU code refuses it
        if gpu is not index:
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
    index.train(sample)
    return index


def _rows(shards: ShardedEmbeddings, rows: np.ndarray) -> np.ndarray:
    """The vectors of the (sorted) global ``rows``, read shard by shard."""
    out, start = [], 0
    for size, vectors in zip(shards.sizes, shards.vectors(), strict=True):
        mine = rows[(rows >= start) & (rows < start + size)] - start
        if len(mine):
            out.append(vectors[torch.from_numpy(mine)].float().numpy())
        start += size
    return np.ascontiguousarray(np.concatenate(out))


def _recall(index: Index, shards: ShardedEmbeddings, rows: np.ndarray, k: int, inner: bool) -> dict[str, Any]:
    """Recall@k of ``index`` against exact search for its (sorted) ``rows``, each query leaving its own row
    out of both answers; the exact neighbours found shard by shard."""
    queries = len(rows)
    q = torch.from_numpy(_rows(shards, rows))
    best = torch.full((queries, k), -math.inf)
    best_ids = torch.full((queries, k), -1, dtype=torch.long)
    start = 0
    own = torch.from_numpy(rows)[:, None]
    for size, vectors in zip(shards.sizes, shards.vectors(), strict=True):
        for lo in range(0, size, CHUNK):  # queries x CHUNK scores at a time, not queries x shard
            v = vectors[lo : lo + CHUNK].float()
            scores = q @ v.T if inner else -torch.cdist(q, v).square()
            ids = torch.arange(start + lo, start + lo + len(v))[None, :].expand(queries, -1)
            scores = scores.masked_fill(ids == own, -math.inf)
            top = torch.topk(torch.cat([best, scores], 1), k, dim=1)
            best, best_ids = top.values, torch.cat([best_ids, ids], 1).gather(1, top.indices)
        start += size
    found = index.search(q, k, exclude=rows.tolist()).ids
    hits = [len(set(a) & set(b)) / k for a, b in zip(best_ids.tolist(), found.tolist(), strict=True)]
    recall = float(np.mean(hits))
    log.info(
        "%s index: Recall@%d against exact search %.4f on %d sampled rows",
        index.meta["kind"],
        k,
        recall,
        queries,
    )
    return {"k": k, "queries": queries, "recall": recall}
