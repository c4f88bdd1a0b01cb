"""Exact k-nearest-neighbour search and retrieval metrics on L2-normalised embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from dml.evaluation.backends import METRICS, Backend, Metric, faiss_available

# Bytes of similarity scores one chunk of queries may hold; bounds memory on SOP-sized sets.
_CHUNK_BYTES = 256 * 2**20
_CPU_BLOCK = 1024


def knn(
    query: torch.Tensor,
    reference: torch.Tensor | None = None,
    k: int = 1,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Indices of the ``k`` most similar reference rows (inner product) for each query, best first.

    Args:
        query: (n, d) embeddings.
        reference: (m, d) embeddings; ``None`` searches ``query`` against itself and excludes each query
            from its own neighbours by index.
        k: neighbours per query (at most m, or n - 1 when searching a set against itself).
        backend: ``torch`` (chunked matmul + top-k), ``faiss`` (exact flat index) or ``auto`` (faiss if
            installed).

    Returns:
        (n, k) int64 indices into the reference rows, on the CPU.
    """
    same = reference is None
    ref = query if reference is None else reference
    k = min(k, ref.shape[0] - int(same))
    if k <= 0:
        return torch.empty(query.shape[0], 0, dtype=torch.long)
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend == "faiss":
        return _knn_faiss(query, ref, k, same)
    if backend == "torch":
        return _knn_torch(query, ref, k, same)
    raise ValueError(f"kNN backend must be 'auto', 'torch' or 'faiss', got {backend!r}")


def _knn_torch(query: torch.Tensor, ref: torch.Tensor, k: int, same: bool) -> torch.Tensor:
    query, ref = query.float(), ref.float().to(query.device)
    chunk = max(1, _CHUNK_BYTES // (4 * ref.shape[0]))
    out = []
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ ref.T
        if same:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = float("-inf")
        out.append(sims.topk(k, dim=1).indices.cpu())
    return torch.cat(out)


def faiss_device(device: torch.device) -> int:
    """The GPU a faiss index should live on for tensors on ``device``: its own GPU, else this process's
    current one (under DDP each rank's)."""
    if device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _knn_faiss(query: torch.Tensor, ref: torch.Tensor, k: int, same: bool) -> torch.Tensor:
    import faiss

    q = np.ascontiguousarray(query.detach().float().cpu().numpy())
    r = q if same else np.ascontiguousarray(ref.detach().float().cpu().numpy())
    index: faiss.Index = faiss.IndexFlatIP(r.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        # this process's GPU (each DDP rank has its own), not GPU 0
        device = faiss_device(query.device)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
    index.add(r)
    _, found = index.search(q, k + int(same))
    idx = torch.from_numpy(found).long()
    if same:
        keep = idx != torch.arange(idx.shape[0])[:, None]
        # A query not found among its own k+1 (ties with duplicates) loses its last neighbour instead.
        keep[keep.all(dim=1), -1] = False
        idx = idx[keep].view(idx.shape[0], k)
    return idx


def recall_at_k(neighbour_labels: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Fraction of queries with a same-class item among their K nearest, for each K in ``ks``.

    Args:
        neighbour_labels: (n, k) labels of each query's neighbours, best first (k >= max(ks)).
        labels: (n,) query labels.
    """
    hits = neighbour_labels == labels[:, None]
    return {f"recall@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def map_at_r(neighbour_labels: torch.Tensor, labels: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
    """MAP@R and R-Precision (Musgrave et al. 2020), R = number of other same-class reference items.

    Args:
        neighbour_labels: (n, k) neighbour labels, best first, with k >= max(r).
        labels: (n,) query labels.
        r: (n,) R per query; queries with R = 0 have nothing to retrieve and are left out.
    """
    valid = r > 0
    if not valid.any():
        return {"map@r": float("nan"), "r_precision": float("nan")}
    nl, lab, r = neighbour_labels[valid], labels[valid], r[valid]
    width = int(r.max())
    rel = (nl[:, :width] == lab[:, None]).float()
    within = (torch.arange(width)[None, :] < r[:, None]).float()
    rel = rel * within
    precision_at_i = rel.cumsum(dim=1) / torch.arange(1, width + 1)[None, :]
    rf = r.float()
    return {
        "map@r": ((precision_at_i * rel).sum(dim=1) / rf).mean().item(),
        "r_precision": (rel.sum(dim=1) / rf).mean().item(),
    }


def euclidean_as_inner_product(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose inner products rank references as the Euclidean distance does: [q, 1] . [r, -|r|^2/2]
    = q.r - |r|^2/2 = (|q|^2 - |q - r|^2) / 2, larger for nearer r."""
    query, ref = query.float(), ref.float()
    ones = torch.ones(query.shape[0], 1, device=query.device)
    return torch.cat([query, ones], 1), torch.cat([ref, -(ref * ref).sum(1, keepdim=True) / 2], 1)


def _positive_counts(labels: torch.Tensor, ref_labels: torch.Tensor, same: bool) -> torch.Tensor:
    """R per query: the reference items of its class (itself excluded when searching its own set)."""
    classes, counts = torch.unique(ref_labels, return_counts=True)
    pos = torch.searchsorted(classes, labels.contiguous()).clamp(max=len(classes) - 1)
    r = torch.where(classes[pos] == labels, counts[pos], torch.zeros_like(labels))
    return r - int(same)


def _scan_torch(
    query: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    same: bool,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked pass over the similarity matrix, never all of it at once.

    Returns each query's first-positive rank (0-based; a large number when it has no positive) and the
    labels of its ``width`` nearest references. Recall@K needs only the rank: the number of other-class
    items more similar than the query's most similar positive, so no top-1000 search is needed.
    """
    device = query.device
    query, ref = query.float(), ref.float().to(device)
    labels, ref_labels = labels.to(device), ref_labels.to(device)
    chunk = max(1, _CHUNK_BYTES // (4 * ref.shape[0]))
    ranks, nearest = [], []
    none = torch.iinfo(torch.int64).max
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ ref.T
        rows = torch.arange(sims.shape[0], device=device)
        if same:
            sims[rows, rows + start] = float("-inf")
        positive = labels[start : start + chunk, None] == ref_labels[None, :]
        if same:
            positive[rows, rows + start] = False
        best_positive = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((sims > best_positive) & ~positive).sum(dim=1)
        ranks.append(torch.where(positive.any(dim=1), rank, torch.full_like(rank, none)).cpu())
        if width:
            nearest.append(ref_labels[sims.topk(width, dim=1).indices].cpu())
    labels_out = torch.cat(nearest) if width else torch.empty(query.shape[0], 0, dtype=torch.long)
    return torch.cat(ranks), labels_out


def _merge_top(
    values: torch.Tensor,
    indices: torch.Tensor,
    new_values: torch.Tensor,
    new_indices: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    v, pos = torch.cat([values, new_values], dim=1).topk(width, dim=1)
    return v, torch.cat([indices, new_indices], dim=1).gather(1, pos)


def _scan_symmetric(x: torch.Tensor, labels: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scan_torch` for a set searched against itself, computing each similarity block once.

    Items are sorted by class so that each row's positives lie in a band around the diagonal: a first
    pass over that band finds each row's most similar positive; a second pass over the blocks above the
    diagonal counts, for rows and columns at once, the items more similar than it, and keeps each row's
    ``width`` nearest. About half the matrix products of a plain pass.
    """
    device, n = x.device, x.shape[0]
    order = torch.argsort(labels.to(device), stable=True)
    xs, ys = x.float()[order], labels.to(device)[order]
    _, counts = torch.unique_consecutive(ys, return_counts=True)
    class_end = torch.cumsum(counts, 0)
    class_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    # Small blocks keep the comparisons in the CPU's cache; on a GPU, big ones keep it busy.
    block = min(_CPU_BLOCK if device.type == "cpu" else 8192, max(1, int((_CHUNK_BYTES // 4) ** 0.5)))
    starts = list(range(0, n, block))
    best = torch.empty(n, device=device)
    for r0 in starts:
        r1 = min(r0 + block, n)
        c0 = int(class_end[class_of[r0]] - counts[class_of[r0]])
        c1 = int(class_end[class_of[r1 - 1]])
        sims = xs[r0:r1] @ xs[c0:c1].T
        positive = ys[r0:r1, None] == ys[None, c0:c1]
        rows = torch.arange(r1 - r0, device=device)
        positive[rows, rows + r0 - c0] = False
        best[r0:r1] = sims.masked_fill(~positive, float("-inf")).amax(dim=1)
    above = torch.zeros(n, dtype=torch.long, device=device)
    top_v = torch.full((n, width), float("-inf"), device=device)
    top_i = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, r0 in enumerate(starts):
        r1 = min(r0 + block, n)
        for c0 in starts[i:]:
            c1 = min(c0 + block, n)
            sims = xs[r0:r1] @ xs[c0:c1].T
            if c0 == r0:
                sims.fill_diagonal_(float("-inf"))
            above[r0:r1] += (sims > best[r0:r1, None]).sum(dim=1, dtype=torch.int32)
            if width:
                v, j = sims.topk(min(width, c1 - c0), dim=1)
                top_v[r0:r1], top_i[r0:r1] = _merge_top(top_v[r0:r1], top_i[r0:r1], v, j + c0, width)
            if c0 != r0:
                above[c0:c1] += (sims > best[None, c0:c1]).sum(dim=0, dtype=torch.int32)
                if width:
                    v, j = sims.T.contiguous().topk(min(width, r1 - r0), dim=1)
                    top_v[c0:c1], top_i[c0:c1] = _merge_top(top_v[c0:c1], top_i[c0:c1], v, j + r0, width)
    none = torch.iinfo(torch.int64).max
    ranks = torch.empty(n, dtype=torch.long, device=device)
    ranks[order] = torch.where(torch.isfinite(best), above, torch.full_like(above, none))
    nearest = torch.empty((n, width), dtype=torch.long, device=device)
    nearest[order] = ys[top_i]
    return ranks.cpu(), nearest.cpu()


def _scan_faiss(
    query: torch.Tensor,
    ref: torch.Tensor | None,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    k: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same outputs as :func:`_scan_torch`, from a faiss top-k search (k = max of the K and R)."""
    neighbour_labels = ref_labels[knn(query, ref, k=k, backend="faiss")]
    hits = neighbour_labels == labels[:, None]
    first = hits.float().argmax(dim=1)
    ranks = torch.where(hits.any(dim=1), first, torch.full_like(first, torch.iinfo(torch.int64).max))
    return ranks, neighbour_labels[:, :width]


def retrieval_scores(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    backend: Backend = "auto",
    metric: Metric = "cosine",
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision of a retrieval split, on exact neighbours.

    Args:
        embeddings: (n, d) L2-normalised query embeddings.
        labels: (n,) query class labels.
        ks: the K of Recall@K.
        reference, reference_labels: a separate gallery (In-Shop's query/gallery protocol). Without it,
            each query searches the other n - 1 items.
        backend: ``torch`` (one blocked pass over the similarities, on the embeddings' device; the
            default, ``auto``) or ``faiss`` (an exact flat index searched for the top max(K, R), on a GPU
            when faiss has one). Both give the same metrics.
        metric: ``cosine`` ranks by inner product (the embeddings are unit vectors); ``euclidean`` by
            Euclidean distance, for embeddings left un-normalised (torch backend).

    Returns:
        {"recall@K": ..., "map@r": ..., "r_precision": ...} as floats in [0, 1].
        Recall@K counts every query; MAP@R and R-Precision leave out queries with nothing to retrieve.
    """
    labels = labels.cpu().long()
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    if embeddings.shape[0] == 0:
        raise ValueError("retrieval_metrics got no embeddings")
    same = reference is None
    if not same and reference_labels is None:
        raise ValueError("reference given without reference_labels")
    ref_labels = labels if same else cast(torch.Tensor, reference_labels).cpu().long()  # checked above
    r = _positive_counts(labels, ref_labels, same)
    n_ref = ref_labels.shape[0] - int(same)
    width = min(int(r.max()), n_ref)
    if backend == "auto":
        backend = "torch"  # the one-pass scan beats a top-1000 faiss search in time and memory
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "euclidean":
        if backend != "torch":
            raise ValueError("the euclidean metric is scored with the torch backend")
        query, ref = euclidean_as_inner_product(embeddings, embeddings if reference is None else reference)
        ranks, nearest = _scan_torch(query, ref, labels, ref_labels, same, width)
    elif backend == "torch" and same:
        ranks, nearest = _scan_symmetric(embeddings, labels, width)
    elif backend == "torch":
        ranks, nearest = _scan_torch(
            embeddings, cast(torch.Tensor, reference), labels, ref_labels, same, width
        )
    elif backend == "faiss":
        ranks, nearest = _scan_faiss(
            embeddings, reference, labels, ref_labels, min(max(max(ks), width), n_ref), width
        )
    else:
        raise ValueError(f"kNN backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    out = {f"recall@{k}": (ranks < k).float().mean().item() for k in ks}
    out.update(map_at_r(nearest, labels, r))
    return out
