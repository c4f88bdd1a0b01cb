"""The entry points that use a trained model: embed.py, index.py, search.py and export.py.

Each checks what it will write before it does any work: an output that exists (without
``overwrite=true``), a folder that cannot be written, too little disk for the embeddings.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.markup import escape

from dml.errors import UserError, whole_number
from dml.inference import Embedder, Embeddings, Index, SearchResult, export
from dml.inference.exporting import export_formats
from dml.inference.index_shards import build_from_shards
from dml.inference.predicting import embed_to_shards
from dml.inference.results import (
    JSON_NAME,
    judged,
    results_json,
    results_page,
    rows,
    short_name,
    write_results,
)
from dml.inference.shards import MANIFEST, ShardedEmbeddings, check_folder_for
from dml.io import check_output, check_space
from dml.log import get_logger

log = get_logger(__name__)


def embed_task(cfg: DictConfig) -> dict[str, float]:
    """Embed ``cfg.images`` with ``cfg.ckpt_path`` into ``cfg.out``: a folder of shards, or one file."""
    out = Path(cfg.out)
    whole_number(cfg.batch_size, "batch_size")
    whole_number(cfg.num_workers, "num_workers", least=0)
    if out.suffix != ".safetensors":
        return _embed_shards(cfg, out)
    if cfg.resume:
        raise UserError(f"resume=true goes on with a folder of shards, and out={str(out)!r} is one file")
    check_output(out, "out", cfg.overwrite)  # before any work: nothing finished is overwritten
    embedder = Embedder.from_checkpoint(cfg.ckpt_path, device=cfg.device, dataset_root=cfg.dataset_root)
    images = embedder.resolve(str(cfg.images))
    # before the model runs: room for what it will write
    check_space(out, "out", Embeddings.file_size(embedder.count(images), embedder.dim))
    embeddings = embedder.embed(images, batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=True)
    embeddings.save(out, overwrite=cfg.overwrite)
    print(f"{len(embeddings.names)} embeddings ({embeddings.dim}-d, {embeddings.metric}) written to {out}")  # noqa: T201
    _say_skipped(embeddings.skipped)
    return {"embedded": float(len(embeddings.names)), "skipped": float(len(embeddings.skipped))}


def _embed_shards(cfg: DictConfig, out: Path) -> dict[str, float]:
    from hydra.utils import instantiate

    for key in ("shard_size", "devices", "num_nodes"):
        whole_number(cfg[key], key)
    check_folder_for(out, cfg.resume, cfg.overwrite)  # before any work: nothing finished is overwritten
    embedder = Embedder.from_checkpoint(cfg.ckpt_path, device=cfg.device, dataset_root=cfg.dataset_root)
    inputs = embedder.inputs(embedder.resolve(str(cfg.images)))
    total = Embeddings.file_size(len(inputs.names), embedder.dim)
    shard = Embeddings.file_size(min(cfg.shard_size, len(inputs.names)), embedder.dim)
    check_space(out / MANIFEST, "out", total, largest=shard)
    done = embed_to_shards(
        embedder,
        inputs,
        out,
        shard_size=cfg.shard_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        callbacks=[instantiate(c) for c in (cfg.get("callbacks") or {}).values()],
    )
    if done is None:  # another process of the run: the first one reports
        return {}
    print(  # noqa: T201
        f"{done.count} embeddings ({done.dim}-d, {done.metric}) written to {out} in {done.shards} shard(s)"
    )
    _say_skipped(done.skipped)
    return {"embedded": float(done.count), "skipped": float(len(done.skipped))}


def _say_skipped(skipped: list[dict[str, str]]) -> None:
    if skipped:
        listed = "\n".join(f"  {s['path']}: {s['error']}" for s in skipped)
        print(f"{len(skipped)} unreadable images skipped:\n{listed}")  # noqa: T201


def index_task(cfg: DictConfig) -> dict[str, float]:
    """Build and save the index of ``cfg.embeddings`` (a folder of shards, or one file)."""
    out = Path(cfg.out)
    check_output(out, "out", cfg.overwrite, marker="meta.json")
    keys = ("kind", "nlist", "nprobe", "hnsw_m", "ef_search", "recall_queries", "recall_k", "seed")
    settings = {key: cfg[key] for key in keys}
    if Path(cfg.embeddings).is_dir():
        shards = ShardedEmbeddings(cfg.embeddings)  # every shard checked before any work
        per_vector = (cfg.pq_m or max(1, shards.dim // 8)) if cfg.kind == "ivfpq" else 4 * shards.dim
        check_space(out / "index.faiss", "out", len(shards) * (per_vector + 8))  # codes and ids
        index = build_from_shards(shards, pq_m=cfg.pq_m, train_size=cfg.train_size, **settings)
    else:
        if cfg.kind == "ivfpq":
            raise UserError(
                "kind=ivfpq is built from a folder of shards: embed with out=<folder> (embed.py's default)"
            )
        embeddings = Embeddings.load(cfg.embeddings)
        check_space(out / "index.faiss", "out", Index.file_size(embeddings))
        index = Index.build(embeddings, **settings)
    index.save(out, overwrite=cfg.overwrite)
    recall = index.meta["recall_vs_exact"]
    measured = (
        f"; Recall@{recall['k']} against exact search {recall['recall']:.4f} ({recall['queries']} queries)"
        if recall
        else ""
    )
    print(f"{cfg.kind} index of {len(index)} {index.dim}-d embeddings written to {out}{measured}")  # noqa: T201
    return {"size": float(len(index))} | ({"recall_vs_exact": recall["recall"]} if recall else {})


def search_task(cfg: DictConfig) -> dict[str, float]:
    """Embed ``cfg.query`` with the index's model, search, print, and write results.json and results.html."""
    out = Path(cfg.out)
    for key, least in (("k", 1), ("html_queries", 0), ("html_neighbours", 1), ("print_queries", 0)):
        whole_number(cfg[key], key, least)
    whole_number(cfg.batch_size, "batch_size")
    whole_number(cfg.num_workers, "num_workers", least=0)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={str(out)!r} is a file; give a folder for {JSON_NAME} and results.html")
    if (out / JSON_NAME).exists() and not cfg.overwrite:
        raise UserError(
            f"out={str(out)!r} already holds {JSON_NAME}; choose another folder or set overwrite=true"
        )
    check_output(out / JSON_NAME, "out", overwrite=True)
    index = Index.load(cfg.index)
    index.check_k(cfg.k)  # before the queries are embedded
    checkpoint = Path(cfg.ckpt_path or index.meta["checkpoint"])
    if not checkpoint.is_file():
        raise UserError(
            f"the index's model {index.meta['checkpoint']} is not there any more; give its checkpoint with ckpt_path=..."
        )
    embedder = Embedder.from_checkpoint(checkpoint, device=cfg.device, dataset_root=cfg.dataset_root)
    index.check_model(embedder.checkpoint_sha256, what=f"checkpoint {checkpoint}'s embeddings")
    if cfg.html_queries and any(name.startswith(f"{embedder.dataset_name}:") for name in index.names):
        embedder.require_dataset("the thumbnails of the index's dataset images in results.html")
    queries = embedder.embed(
        str(cfg.query), key="query", batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=True
    )
    position = {name: i for i, name in enumerate(index.names)}
    own = [position.get(name, -1) for name in queries.names]
    result = index.search(queries.vectors, cfg.k, exclude=own if any(i >= 0 for i in own) else None)
    metrics, notes = _recall(queries, result, index), _notes(result, index)
    page = results_page(
        queries,
        result,
        embedder.picture,
        embedder.checkpoint,
        cfg.html_queries,
        cfg.html_neighbours,
        metrics,
        embedder.class_names() if cfg.html_queries else {},
    )
    json_path, page_path = write_results(out, results_json(queries, result, index, metrics, notes), page)
    _print(queries, result, metrics, cfg.print_queries)
    for note in notes:
        print(f"note: {note}")  # noqa: T201
    print(judged(queries, result, cfg.html_queries).summary())  # noqa: T201
    print(f"results of {len(queries.names)} queries: {json_path}, {page_path}")  # noqa: T201
    return metrics


def _recall(queries: Embeddings, result: SearchResult, index: Index) -> dict[str, float]:
    """Recall@1 and Recall@k where both the queries and the index have labels (a neighbour an IVF index
    did not return is a miss)."""
    known = queries.labels >= 0
    if not bool(known.any()) or not bool((index.labels >= 0).all()):
        return {}
    hits = result.labels[known] == queries.labels[known][:, None]
    k = hits.shape[1]
    return {"recall@1": hits[:, 0].float().mean().item(), f"recall@{k}": hits.any(1).float().mean().item()}


def _notes(result: SearchResult, index: Index) -> list[str]:
    k = result.ids.shape[1]
    short = int((result.found < k).sum())
    if not short:
        return []
    params, kind = index.meta.get("params", {}), index.meta["kind"]
    why = (
        f"the {params.get('nprobe')} of {params.get('nlist')} IVF cells searched hold fewer. Build the index "
        "with a larger nprobe (index.py nprobe=...)"
        if kind in ("ivf", "ivfpq")
        else f"the {kind} index returned fewer. Build the index with a larger ef_search (index.py ef_search=...)"
    )
    return [
        f"{short} of {len(result.ids)} queries got fewer than {k} neighbours: {why}, or kind=flat for exact search"
    ]


def _print(queries: Embeddings, result: SearchResult, metrics: dict[str, float], limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    if limit:
        table = Table(title=f"nearest neighbours ({result.score_name})")
        table.add_column("query")
        for j in range(min(result.ids.shape[1], 3)):
            table.add_column(f"#{j + 1}")
        for row in rows(queries, result, limit, neighbours=3):
            # file names are text, not rich markup: "photo [final].png" keeps its brackets
            table.add_row(
                escape(short_name(row["query"])),
                *[escape(f"{short_name(n['name'])} {n[result.score_name]:.3f}") for n in row["neighbours"]],
            )
        Console().print(table)
    if metrics:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # noqa: T201


def export_task(cfg: DictConfig) -> dict[str, float]:
    """Export ``cfg.ckpt_path`` to ``cfg.out``."""
    formats = export_formats(cfg.formats if isinstance(cfg.formats, str) else list(cfg.formats))
    check_output(Path(cfg.out), "out", cfg.overwrite, marker="preprocessing.json")
    embedder = Embedder.from_checkpoint(cfg.ckpt_path, device="cpu")
    model = (embedder.module.backbone, embedder.module.head)
    weights = sum(p.numel() * p.element_size() for part in model for p in part.parameters())
    check_space(Path(cfg.out) / "model", "out", weights * len(formats))  # each format holds the weights
    written = export(embedder, cfg.out, formats=formats, overwrite=cfg.overwrite)
    for kind, path in written.items():
        print(f"{kind}: {path}")  # noqa: T201
    return {}
