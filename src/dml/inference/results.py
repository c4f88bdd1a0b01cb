"""Search results as files: ``results.json`` (every query and neighbour) and ``results.html`` (a page that
opens anywhere on its own: thumbnails inline, hits green, misses red).

Both are rendered before either is written, and ``results.json`` is written last: a folder that holds
it holds the page of the same search.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dml.data.images import convert
from dml.evaluation.failures import Shown, failures_first
from dml.inference.embeddings import Embeddings
from dml.inference.index import Index, SearchResult
from dml.io import write_atomic

JSON_NAME, PAGE_NAME = "results.json", "results.html"


def rows(
    queries: Embeddings,
    result: SearchResult,
    limit: int | None = None,
    neighbours: int | None = None,
    order: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """The queries ``order`` (all, in their order, by default) or the first ``limit``, each with its first
    ``neighbours`` neighbours (all it got by default: an IVF index may return fewer than k)."""
    out = []
    if order is None:
        order = range(min(len(queries.names), limit if limit is not None else len(queries.names)))
    for q in order:
        found = [j for j in range(result.ids.shape[1]) if result.ids[q, j] >= 0][:neighbours]
        out.append(
            {
                "query": queries.names[q],
                "label": int(queries.labels[q]) if queries.labels[q] >= 0 else None,
                "neighbours": [
                    {
                        "name": result.names[q][j],
                        "label": int(result.labels[q, j]) if result.labels[q, j] >= 0 else None,
                        result.score_name: round(float(result.scores[q, j]), 6),
                    }
                    for j in found
                ],
            }
        )
    return out


def judged(queries: Embeddings, result: SearchResult, shown: int) -> Shown:
    """The failures first, worst first, then a sample of the successes (:mod:`dml.evaluation.failures`)."""
    first = result.scores[:, 0] if result.scores.shape[1] else torch.zeros(len(queries.names))
    return failures_first(
        queries.labels, result.labels, first.nan_to_num(0.0), result.score_name == "similarity", shown
    )


def results_json(
    queries: Embeddings, result: SearchResult, index: Index, metrics: dict[str, float], notes: list[str]
) -> str:
    """``results.json``: the index, the metrics, a summary (failures worst first), the notes, the skipped
    queries and every result in the queries' order."""
    everything = judged(queries, result, len(queries.names))
    payload = {
        "index": {"kind": index.meta["kind"], "size": len(index), "checkpoint": index.meta["checkpoint"]},
        "score": result.score_name,
        "metrics": metrics,
        "summary": {
            "queries": len(queries.names),
            "failures": everything.failures,
            "successes": everything.successes,
            "without_class": everything.unjudged,
            "failures_worst_first": everything.order[: everything.failures],  # positions in "results"
        },
        "notes": notes,
        "skipped": queries.skipped,
        "results": rows(queries, result),
    }
    return json.dumps(payload, indent=1)


def short_name(name: str) -> str:
    """A file's name, or a dataset item's ``<split>/<position>``."""
    if ":" in name and not Path(name).exists():
        return name.split(":", 1)[1]
    return Path(name).name


def _thumbnail(image: Image.Image | None, size: int = 112) -> str:
    if image is None:
        return '<div class="missing">no image</div>'
    image = convert(image, "RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def results_page(
    queries: Embeddings,
    result: SearchResult,
    picture: Callable[[str], Image.Image | None],
    checkpoint: str,
    shown_queries: int,
    shown_neighbours: int,
    metrics: dict[str, float] | None = None,
    class_names: dict[int, str] | None = None,
) -> str:
    """``results.html``: a summary line, then ``shown_queries`` queries with their first
    ``shown_neighbours`` neighbours: the failures first (first neighbour of another class), worst first,
    then successes at random; each image inline (base64, drawn once however often it appears), with its
    class (its name where ``class_names`` knows it)."""
    thumbnails: dict[str, str] = {}
    names = class_names or {}

    def thumbnail(name: str) -> str:
        if name not in thumbnails:
            thumbnails[name] = _thumbnail(picture(name))
        return thumbnails[name]

    def of_class(label: int | None) -> str:
        return "" if label is None else f"<br>class {html.escape(names.get(label, str(label)))}"

    shown = judged(queries, result, shown_queries)
    cells = []
    for row in rows(queries, result, neighbours=shown_neighbours, order=shown.order):
        label = row["label"]
        items = [
            f'<td class="query">{thumbnail(row["query"])}<br>{html.escape(short_name(row["query"]))}'
            f"{of_class(label)}</td>"
        ]
        for n in row["neighbours"]:
            match = label is not None and n["label"] == label
            cls = "hit" if match else ("miss" if label is not None and n["label"] is not None else "")
            items.append(
                f'<td class="{cls}">{thumbnail(n["name"])}<br>{html.escape(short_name(n["name"]))}'
                f"{of_class(n['label'])}<br>{result.score_name} {n[result.score_name]:.4f}</td>"
            )
        cells.append("<tr>" + "".join(items) + "</tr>")
    k = result.ids.shape[1]
    recall = ", ".join(
        f"{key.replace('recall', 'Recall')} {value:.4f}" for key, value in (metrics or {}).items()
    )
    summary = html.escape(shown.summary()) + (f". {recall}" if recall else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dml search results</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;font-size:11px;padding:4px;vertical-align:top}}
td.query{{background:#eef}} td.hit{{background:#dfd}} td.miss{{background:#fdd}} img{{max-width:112px}}
.missing{{width:112px;height:112px;background:#ddd}}</style></head><body>
<h1>Search results</h1><p class="summary">{summary}.</p><p>{len(shown.order)} of the {len(queries.names)}
queries shown, each with its first {min(shown_neighbours, k)} of {k} neighbours (all are in {JSON_NAME});
model {html.escape(checkpoint)}; each row: the query, then its neighbours best first ({result.score_name}).</p>
<table>{"".join(cells)}</table></body></html>"""


def write_results(out: Path, json_text: str, page: str) -> tuple[Path, Path]:
    """Write ``results.html``, then ``results.json``, each complete or absent; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PAGE_NAME, page)
    write_atomic(out / JSON_NAME, json_text)
    return out / JSON_NAME, out / PAGE_NAME
