"""Pictures of an embedding space: a 2-D map, the singular-value spectrum, a retrieval grid.

Each function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from dml.evaluation.failures import failures_first
from dml.io import atomic_path


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def project_2d(embeddings: torch.Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2) by t-SNE or PCA."""
    x = embeddings.detach().float().cpu().numpy()
    if x.shape[1] <= 2 or len(x) < 4:  # too few points to project: the first two coordinates
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(
            n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3)
        ).fit_transform(x)
    raise ValueError(f"projection method must be 'tsne' or 'pca', got {method!r}")


def embedding_map(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    max_points: int = 1000,
    method: str = "tsne",
    seed: int = 0,
    title: str = "",
    class_names: Sequence[str] | None = None,
    legend_title: str = "class",
) -> Path:
    """Scatter of a 2-D projection of (at most ``max_points`` of) the embeddings, coloured by class, with a
    legend of the classes (``class_names[label]``, else the label) when there are at most 20 of them."""
    n = embeddings.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values
    xy = project_2d(embeddings[keep], method, seed)
    y = labels[keep].cpu().numpy()
    classes, colour = np.unique(y, return_inverse=True)
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "hsv")
    for i, c in enumerate(classes):
        name = class_names[int(c)] if class_names is not None else str(c)
        points = xy[colour == i]
        ax.scatter(
            points[:, 0],
            points[:, 1],
            color=cmap(i / max(len(classes) - 1, 1) if len(classes) > 20 else i),
            s=6,
            alpha=0.8,
            label=name,
        )
    if len(classes) <= 20:
        ax.legend(title=legend_title, markerscale=3, fontsize="small", loc="best", framealpha=0.8)
    if embeddings.shape[1] > 2:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title or f"{method.upper()} of {len(keep)} embeddings, {len(classes)} classes")
    return save_figure(fig, path)


def spectrum_plot(values: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Normalised singular values (largest = 1) on a log scale: a collapsed space drops off early."""
    s = values.detach().double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(np.arange(1, len(s) + 1), s / s[0])
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(title or "singular-value spectrum of the embeddings")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _as_image(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        array = tensor.permute(1, 2, 0).numpy() if tensor.ndim == 3 else tensor.numpy()
        return np.clip(array.squeeze(), 0, 1)
    return np.asarray(image)


def retrieval_grid(
    queries: Sequence[Any],
    neighbours: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per query: the query, then its nearest items; wrong ones framed in red, right in green."""
    rows, cols = len(queries), 1 + max(len(n) for n in neighbours)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    for r, (query, found, ok) in enumerate(zip(queries, neighbours, correct, strict=True)):
        items = [(query, None)] + list(zip(found, ok, strict=True))
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            image, hit = items[c]
            array = _as_image(image)
            ax.imshow(array, cmap="gray" if array.ndim == 2 else None)
            if hit is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor("green" if hit else "red")
                    spine.set_linewidth(3)
            elif r == 0:
                ax.set_title("query", fontsize=8)
    return save_figure(fig, path)


def _neighbours(
    embeddings: torch.Tensor,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    leave_out_self: bool,
    k: int,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, scores) of each query's ``k`` nearest gallery items, best first, in chunks of queries."""
    found, scores = [], []
    g = embeddings[gallery].float()
    for chunk in queries.split(1024):
        q = embeddings[chunk].float()
        sims = -torch.cdist(q, g) if metric == "euclidean" else q @ g.T
        if leave_out_self:
            sims[chunk[:, None] == gallery[None, :]] = float("-inf")  # not the query itself
        top = sims.topk(k, dim=1)
        found.append(gallery[top.indices])
        scores.append(top.values)
    return torch.cat(found), torch.cat(scores)


def split_retrievals(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    roles: torch.Tensor | None,
    raw_image: Callable[[int], Any],
    queries: torch.Tensor,
    path: str | Path,
    top_k: int = 5,
    metric: str = "cosine",
    shown: int | None = None,
) -> Path:
    """:func:`retrieval_grid` for ``queries`` (positions in a split) and their ``top_k`` nearest items.

    ``raw_image(position)`` is an item's image as read (without the model's transform). With
    query/gallery ``roles`` (0 query, 1 gallery), queries search the gallery; otherwise the other items.
    ``metric``: ``cosine`` (unit-norm embeddings) or ``euclidean`` (embeddings left as they are).
    ``shown``: draw that many of ``queries``, the failures first (first neighbour of another class),
    worst first, then successes at random (:func:`~dml.evaluation.failures.failures_first`), with a
    title saying how many fail; by default every query, in order.
    """
    gallery = torch.arange(len(labels)) if roles is None else torch.nonzero(roles == 1).flatten()
    k = min(top_k, len(gallery) - int(roles is None))
    found, scores = _neighbours(embeddings, queries, gallery, roles is None, k, metric)
    title = ""
    if shown is not None:
        judged = failures_first(labels[queries], labels[found], scores[:, 0], True, shown)
        right = labels[found] == labels[queries][:, None]
        recall = f"Recall@1 {right[:, 0].float().mean():.4f}, Recall@{k} {right.any(1).float().mean():.4f}"
        title = f"{judged.summary()}. {recall}"
        queries, found = queries[judged.order], found[judged.order]
    return retrieval_grid(
        [raw_image(int(q)) for q in queries],
        [[raw_image(int(j)) for j in row] for row in found],
        [[bool(labels[j] == labels[q]) for j in row] for q, row in zip(queries, found, strict=True)],
        path,
        title,
    )
