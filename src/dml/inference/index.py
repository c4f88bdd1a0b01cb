"""A faiss index of an embeddings file, saved with its names, labels and model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.errors import UserError, whole_number
from dml.evaluation.retrieval import faiss_device
from dml.inference.embeddings import Embeddings
from dml.io import atomic_path, refuse_existing, write_failed
from dml.log import get_logger

log = get_logger(__name__)

INDEX_FORMAT = "dml-index/2"  # names and labels in rows.parquet; dml-index/1 kept them in meta.json
READ_FORMATS = ("dml-index/1", INDEX_FORMAT)
GPU_K_LIMIT = 2048  # faiss's GPU indexes return at most this many neighbours


@dataclass
class SearchResult:
    """Each query's ``k`` neighbours, best first: their rows in the index, names, labels and scores
    (cosine similarity for cosine models, Euclidean distance otherwise). Where an approximate index
    found fewer than ``k`` (IVF: the cells searched hold fewer), the row ends in id -1, label -1, name ''
    and score NaN."""

    ids: torch.Tensor
    scores: torch.Tensor
    names: list[list[str]]
    labels: torch.Tensor
    score_name: str

    @property
    def found(self) -> torch.Tensor:
        """(n,) how many neighbours each query got."""
        return (self.ids >= 0).sum(1)


def _faiss():
    from dml.evaluation.backends import faiss_available

    faiss_available()  # quiets faiss's loader before the import
    try:
        import faiss
    except ImportError as e:
        raise UserError("the index needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


class Index:
    """A faiss index of an embeddings file, with the file's names, labels and model.

    Build with :meth:`build`, write with :meth:`save`, read with :meth:`load`, query with :meth:`search`.
    """

    KINDS = ("flat", "ivf", "hnsw")

    def __init__(self, index: Any, meta: dict[str, Any]):
        self.index, self.meta = index, meta
        self.labels = torch.tensor(meta["labels"], dtype=torch.long)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def names(self) -> list[str]:
        return self.meta["names"]

    def __len__(self) -> int:
        return len(self.meta["names"])

    @classmethod
    def build(
        cls,
        embeddings: Embeddings,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        recall_queries: int = 1000,
        recall_k: int = 10,
        seed: int = 0,
    ) -> Index:
        """Exact search (``flat``) by default; ``ivf`` (``nlist`` cells, ``nprobe`` searched; default
        nlist 4 sqrt(N), at most one cell per 39 embeddings as faiss's k-means wants) or ``hnsw``
        (``hnsw_m`` links, ``ef_search``) for large galleries, with their Recall@``recall_k`` against
        exact search measured on ``recall_queries`` held-out rows (at most a tenth, left out of the IVF
        training).

        Raises:
            UserError: an unknown kind, a setting that is not a whole number of at least 1, an approximate
                index of fewer than 2 embeddings, or more IVF cells than embeddings to train them on.
        """
        faiss = _faiss()
        if kind not in cls.KINDS:
            raise UserError(f"kind={kind!r} must be one of {', '.join(cls.KINDS)}")
        for key, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
            whole_number(value, key)
        for key, value in (("recall_queries", recall_queries), ("recall_k", recall_k)):
            whole_number(value, key)
        x = np.ascontiguousarray(embeddings.vectors.float().numpy())
        n, d = x.shape
        if kind != "flat" and n < 2:
            raise UserError(
                f"kind={kind} over {n} embedding: an approximate index needs 2 or more (some are held out to "
                "measure its recall against exact search); use kind=flat, exact and as fast at this size"
            )
        held = max(1, min(recall_queries, n // 10)) if kind != "flat" else 0
        inner = embeddings.metric == "cosine"
        metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
        params: dict[str, Any] = {}
        if kind == "ivf":
            rest, per_cell = n - held, 39  # faiss's k-means wants about 39 training points a cell
            fitting = max(1, rest // per_cell)
            if nlist is None:
                nlist = min(max(1, int(4 * np.sqrt(n))), fitting)
            elif whole_number(nlist, "nlist") > rest:
                raise UserError(
                    f"nlist={nlist}: the IVF's cells are trained on the {rest} embeddings left once {held} are "
                    f"held out to measure its recall, and there cannot be more cells than that; give "
                    f"nlist={fitting} or less (faiss wants about {per_cell} embeddings a cell), or kind=flat, "
                    "exact and fast at this size"
                )
            params = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
        elif kind == "hnsw":
            params = {"hnsw_m": hnsw_m, "ef_search": ef_search}

        def new(rows: np.ndarray) -> Any:
            """The index of ``kind`` over ``rows`` (IVF cells trained on them)."""
            if kind == "flat":
                index = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
            elif kind == "ivf":
                quantizer = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
                index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], metric)
                index.train(rows)
                index.nprobe = params["nprobe"]
            else:
                index = faiss.IndexHNSWFlat(d, hnsw_m, metric)
                index.hnsw.efSearch = ef_search
            index.add(rows)
            return index

        meta = {
            "format": INDEX_FORMAT,
            "kind": kind,
            "params": params,
            "metric": embeddings.metric,
            "dim": d,
            "names": embeddings.names,
            "labels": embeddings.labels.tolist(),
            "checkpoint": embeddings.checkpoint,
            "checkpoint_sha256": embeddings.checkpoint_sha256,
            "recall_vs_exact": None,
        }
        if kind != "flat":
            # Recall against exact search on held-out rows: an index of the other rows (cells trained on
            # them), searched with the held-out ones, which are in neither result.
            held_rows = np.random.default_rng(seed).choice(n, size=held, replace=False)
            rest = np.delete(x, held_rows, axis=0)
            k = min(recall_k, len(rest))
            exact = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
            exact.add(rest)
            _, truth = exact.search(x[held_rows], k)
            _, found = new(rest).search(x[held_rows], k)
            hits = [len(set(a) & set(b)) / k for a, b in zip(truth.tolist(), found.tolist(), strict=True)]
            meta["recall_vs_exact"] = {"k": k, "queries": held, "recall": float(np.mean(hits))}
            log.info(
                "%s index: Recall@%d against exact search %.4f on %d held-out queries",
                kind,
                k,
                meta["recall_vs_exact"]["recall"],
                held,
            )
        return cls(new(x), meta)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """``folder/index.faiss`` and ``folder/meta.json``, written together (atomically)."""
        faiss = _faiss()
        folder = Path(folder)
        refuse_existing(folder, "out", overwrite, marker="meta.json")
        index = faiss.index_gpu_to_cpu(self.index) if _on_gpu(self.index) else self.index
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            try:
                faiss.write_index(index, str(tmp / "index.faiss"))
            except RuntimeError as e:  # faiss reports a failed write (a full disk) as a RuntimeError
                raise write_failed(folder / "index.faiss", str(e).strip().splitlines()[-1]) from e
            _write_rows(tmp / "rows.parquet", self.meta["names"], self.meta["labels"])
            rest = {k: v for k, v in self.meta.items() if k not in ("names", "labels")}
            (tmp / "meta.json").write_text(json.dumps(rest | {"format": INDEX_FORMAT}))
        return folder

    @staticmethod
    def file_size(embeddings: Embeddings) -> int:
        """The bytes at least that an index of ``embeddings`` takes on disk (its vectors)."""
        return int(embeddings.vectors.numel()) * 4

    @classmethod
    def load(cls, folder: str | Path, gpu: str | bool = "auto") -> Index:
        faiss = _faiss()
        folder = Path(folder)
        meta_file, index_file = folder / "meta.json", folder / "index.faiss"
        if not meta_file.is_file() or not index_file.is_file():
            raise UserError(
                f"index={str(folder)!r} is not an index folder written by index.py (meta.json, index.faiss)"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") not in READ_FORMATS:
            raise UserError(
                f"{meta_file} is not an index written by index.py (format {meta.get('format')!r})"
            )
        if "names" not in meta:  # dml-index/2: the rows' names and labels beside it
            meta["names"], meta["labels"] = _read_rows(folder / "rows.parquet")
        index = faiss.read_index(str(index_file))
        use_gpu = gpu is True or (
            gpu == "auto" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        )
        if use_gpu and meta["kind"] != "hnsw":
            index = to_gpu(faiss, index, faiss_device(torch.device("cpu")))
        return cls(index, meta)

    def check_k(self, k: int) -> None:
        """Refuse a ``k`` over what faiss returns from this index (2,048 on a GPU), before any work."""
        if _on_gpu(self.index) and k > GPU_K_LIMIT:
            raise UserError(
                f"k={k} is over the {GPU_K_LIMIT} neighbours faiss returns from a GPU index: give "
                f"k={GPU_K_LIMIT} or less, or search on the CPU"
            )

    def check_model(self, checkpoint_sha256: str, what: str = "the query embeddings") -> None:
        """Refuse embeddings of another model than the one this index was built from."""
        if checkpoint_sha256 != self.meta["checkpoint_sha256"]:
            raise UserError(
                f"{what} come from another model than this index: it was built from {self.meta['checkpoint']} "
                f"(sha256 {self.meta['checkpoint_sha256'][:12]}...), they from a checkpoint with sha256 "
                f"{checkpoint_sha256[:12]}...; embeddings of different models are not comparable. Embed with "
                "the index's checkpoint, or build an index from this model's embeddings."
            )

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 10,
        checkpoint_sha256: str | None = None,
        exclude: Sequence[int] | None = None,
    ) -> SearchResult:
        """The ``k`` nearest rows of each query, best first.

        Args:
            queries: (n, d) embeddings of this index's model.
            checkpoint_sha256: the queries' model; another than the index's is refused.
            exclude: per query, a row of the index to leave out of its neighbours (its own, when the query
                is in the index), or -1.
        """
        if checkpoint_sha256 is not None:
            self.check_model(checkpoint_sha256)
        q = torch.as_tensor(queries).float()
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(
                f"queries of shape {tuple(q.shape)} do not fit this index of {self.dim}-d embeddings: give "
                f"(n, {self.dim}) embeddings of the model {self.meta['checkpoint']}"
            )
        whole_number(k, "k")
        extra = 1 if exclude is not None else 0
        available = len(self) - extra
        if available < 1:
            raise UserError(f"the index holds {len(self)} item(s): no other item to return as a neighbour")
        if k > available:
            log.warning(
                "k=%d is more than the %d items the index can return: each query gets %d",
                k,
                available,
                available,
            )
            k = available
        if _on_gpu(self.index) and k + extra > GPU_K_LIMIT:
            raise UserError(
                f"k={k} is over the {GPU_K_LIMIT} neighbours faiss returns from a GPU index"
                f"{' (one more is searched to leave each query out of its own answer)' if extra else ''}: "
                f"give k={GPU_K_LIMIT - extra} or less, or search on the CPU"
            )
        scores, ids = self.index.search(np.ascontiguousarray(q.numpy()), k + extra)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        if exclude is not None:
            # -2 marks "not in the index" (faiss pads missing neighbours with -1); each row keeps its
            # first k entries that are not the query itself.
            own = torch.as_tensor([i if i >= 0 else -2 for i in exclude], dtype=torch.long)[:, None]
            keep = ids != own
            keep &= keep.cumsum(1) <= k
            ids, scores = ids[keep].view(len(q), k), scores[keep].view(len(q), k)
        euclidean = self.meta["metric"] != "cosine"
        if euclidean:
            scores = scores.clamp_min(0).sqrt()
        scores = scores.masked_fill(ids < 0, float("nan"))  # faiss's padding scores are +-3.4e38
        names = [[self.names[i] if i >= 0 else "" for i in row] for row in ids.tolist()]
        labels = torch.where(ids >= 0, self.labels[ids.clamp_min(0)], -1)
        return SearchResult(ids, scores, names, labels, "distance" if euclidean else "similarity")


def to_gpu(faiss: Any, index: Any, device: int = 0) -> Any:
    """``index`` on a GPU, or left on the CPU with a message where faiss's GPU code refuses it. IVF-PQ's
    lookup tables go in float16: in float32, 64 or more sub-quantizers need more shared memory than a
    GPU has (48 KiB)."""
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index, options)
    except RuntimeError as e:
        log.warning(
            "the index stays on the CPU: faiss's GPU code refused it (%s)", str(e).strip().splitlines()[-1]
        )
        return index


def _write_rows(path: Path, names: list[str], labels: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"name": pa.array(names, pa.string()), "label": pa.array(labels, pa.int64())}), str(path)
    )


def _read_rows(path: Path) -> tuple[list[str], list[int]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(
            f"the index folder {path.parent} has no {path.name}: copy the whole folder, or build it again"
        )
    table = pq.read_table(str(path))
    return table.column("name").to_pylist(), table.column("label").to_pylist()


def _on_gpu(index: Any) -> bool:
    return "Gpu" in type(index).__name__
