"""The entry points that use a trained model: embed.py, index.py, search.py and export.py."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image

from dml.errors import UserError
from dml.inference import Embedder, Embeddings, Index, SearchResult, export
from dml.log import get_logger

log = get_logger(__name__)


def embed_task(cfg: DictConfig) -> dict[str, float]:
    """Embed ``cfg.images`` with ``cfg.ckpt_path`` into ``cfg.out``."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # before any work: nothing finished is overwritten
        raise UserError(f"out={str(out)!r} already exists; choose another path or set overwrite=true")
    embedder = Embedder.from_checkpoint(cfg.ckpt_path, device=cfg.device, dataset_root=cfg.dataset_root)
    embeddings = embedder.embed(
        str(cfg.images), batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=True
    )
    embeddings.save(out, overwrite=cfg.overwrite)
    print(f"{len(embeddings.names)} embeddings ({embeddings.dim}-d, {embeddings.metric}) written to {out}")  # noqa: T201
    if embeddings.skipped:
        listed = "\n".join(f"  {s['path']}: {s['error']}" for s in embeddings.skipped)
        print(f"{len(embeddings.skipped)} unreadable images skipped:\n{listed}")  # noqa: T201
    return {"embedded": float(len(embeddings.names)), "skipped": float(len(embeddings.skipped))}


def index_task(cfg: DictConfig) -> dict[str, float]:
    """Build and save the index of ``cfg.embeddings``."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"out={str(out)!r} already exists; choose another folder or set overwrite=true")
    embeddings = Embeddings.load(cfg.embeddings)
    index = Index.build(
        embeddings,
        kind=cfg.kind,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        hnsw_m=cfg.hnsw_m,
        ef_search=cfg.ef_search,
        recall_queries=cfg.recall_queries,
        recall_k=cfg.recall_k,
        seed=cfg.seed,
    )
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
    if (out / "results.json").exists() and not cfg.overwrite:
        raise UserError(
            f"out={str(out)!r} already holds results.json; choose another folder or set overwrite=true"
        )
    index = Index.load(cfg.index)
    checkpoint = Path(cfg.ckpt_path or index.meta["checkpoint"])
    if not checkpoint.is_file():
        raise UserError(
            f"the index's model {index.meta['checkpoint']} is not there any more; give its checkpoint with ckpt_path=..."
        )
    embedder = Embedder.from_checkpoint(checkpoint, device=cfg.device, dataset_root=cfg.dataset_root)
    index.check_model(embedder.checkpoint_sha256, what=f"checkpoint {checkpoint}'s embeddings")
    queries = embedder.embed(
        str(cfg.query), key="query", batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=True
    )
    position = {name: i for i, name in enumerate(index.names)}
    own = [position.get(name, -1) for name in queries.names]
    result = index.search(queries.vectors, cfg.k, exclude=own if any(i >= 0 for i in own) else None)
    metrics = _recall(queries, result)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", queries, result, index, metrics)
    _write_html(out / "results.html", queries, result, embedder, cfg.html_queries)
    _print(queries, result, metrics, cfg.print_queries)
    print(f"results of {len(queries.names)} queries: {out / 'results.json'}, {out / 'results.html'}")  # noqa: T201
    return metrics


def _recall(queries: Embeddings, result: SearchResult) -> dict[str, float]:
    """Recall@1 and Recall@k where both the queries and the index have labels."""
    known = queries.labels >= 0
    if not bool(known.any()) or not bool((result.labels[known] >= 0).all()):
        return {}
    hits = result.labels[known] == queries.labels[known][:, None]
    k = hits.shape[1]
    return {"recall@1": hits[:, 0].float().mean().item(), f"recall@{k}": hits.any(1).float().mean().item()}


def _rows(queries: Embeddings, result: SearchResult, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for q in range(min(len(queries.names), limit if limit is not None else len(queries.names))):
        rows.append(
            {
                "query": queries.names[q],
                "label": int(queries.labels[q]) if queries.labels[q] >= 0 else None,
                "neighbours": [
                    {
                        "name": result.names[q][j],
                        "label": int(result.labels[q, j]) if result.labels[q, j] >= 0 else None,
                        result.score_name: round(float(result.scores[q, j]), 6),
                    }
                    for j in range(result.ids.shape[1])
                ],
            }
        )
    return rows


def _write_json(path: Path, queries: Embeddings, result: SearchResult, index: Index, metrics: dict) -> None:
    payload = {
        "index": {"kind": index.meta["kind"], "size": len(index), "checkpoint": index.meta["checkpoint"]},
        "score": result.score_name,
        "metrics": metrics,
        "skipped": queries.skipped,
        "results": _rows(queries, result),
    }
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def _short(name: str) -> str:
    """A file's name, or a dataset item's ``<split>/<position>``."""
    if ":" in name and not Path(name).exists():
        return name.split(":", 1)[1]
    return Path(name).name


def _thumbnail(image: Image.Image | None, size: int = 112) -> str:
    if image is None:
        return '<div class="missing">no image</div>'
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _write_html(
    path: Path, queries: Embeddings, result: SearchResult, embedder: Embedder, limit: int
) -> None:
    """A page with every image inline (base64), so it opens anywhere on its own."""
    cells = []
    for row in _rows(queries, result, limit):
        label = row["label"]
        items = [
            f'<td class="query">{_thumbnail(embedder.picture(row["query"]))}<br>{html.escape(_short(row["query"]))}</td>'
        ]
        for n in row["neighbours"]:
            match = label is not None and n["label"] == label
            cls = "hit" if match else ("miss" if label is not None and n["label"] is not None else "")
            items.append(
                f'<td class="{cls}">{_thumbnail(embedder.picture(n["name"]))}<br>{html.escape(_short(n["name"]))}'
                f"<br>{result.score_name} {n[result.score_name]:.4f}</td>"
            )
        cells.append("<tr>" + "".join(items) + "</tr>")
    shown = f"the first {min(limit, len(queries.names))} of {len(queries.names)} queries"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dml search results</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;font-size:11px;padding:4px;vertical-align:top}}
td.query{{background:#eef}} td.hit{{background:#dfd}} td.miss{{background:#fdd}} img{{max-width:112px}}
.missing{{width:112px;height:112px;background:#ddd}}</style></head><body>
<h1>Search results</h1><p>{shown}; model {html.escape(embedder.checkpoint)}; each row: the query, then its
neighbours best first ({result.score_name}).</p><table>{"".join(cells)}</table></body></html>"""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(page)
    tmp.replace(path)


def _print(queries: Embeddings, result: SearchResult, metrics: dict[str, float], limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"nearest neighbours ({result.score_name})")
    table.add_column("query")
    for j in range(min(result.ids.shape[1], 3)):
        table.add_column(f"#{j + 1}")
    for row in _rows(queries, result, limit):
        table.add_row(
            _short(row["query"]),
            *[f"{_short(n['name'])} {n[result.score_name]:.3f}" for n in row["neighbours"][:3]],
        )
    Console().print(table)
    if metrics:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # noqa: T201


def export_task(cfg: DictConfig) -> dict[str, float]:
    """Export ``cfg.ckpt_path`` to ``cfg.out``."""
    embedder = Embedder.from_checkpoint(cfg.ckpt_path, device="cpu")
    written = export(embedder, cfg.out, formats=list(cfg.formats), overwrite=cfg.overwrite)
    for kind, path in written.items():
        print(f"{kind}: {path}")  # noqa: T201
    return {}
