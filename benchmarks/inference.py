"""Embedding, exact search and approximate search of the package against their references, in one run on
the same data.

    python -m benchmarks.inference [--parts embed search approximate] [--images 640] [--batch 32]
        [--workers 1] [--sizes 100000 1000000] [--queries 1000] [--nlist 1024] [--data DIR]

- ``embed``: ResNet-50 (random weights) at 224 px through ``embed.py``'s path (JPEG files of 500 x 375 with
  natural-image statistics decoded, resized and cropped in ``--workers`` loader processes, the forward
  pass, the shards written: :func:`dml.inference.predicting.embed_to_shards`, Lightning's predict loop
  and its start included), against the model's forward pass alone on tensors already in memory.
- ``search``: exact search of ``--queries`` queries for 10 neighbours among ``--sizes`` random clustered
  512-d unit vectors: ``dml.inference.Index`` (kind=flat) against raw faiss ``IndexFlatIP`` and
  pytorch-metric-learning's ``InferenceModel`` (faiss under it; an identity trunk, so only its search is
  timed); open-metric-learning's ``RetrievalResults`` where it installs. The fastest of 7 searches (a shared
  machine's other work only ever slows one down), in a process of its own for each gallery size.
- ``approximate``: at the largest size, the vectors written as shards and indexed from them
  (:func:`dml.inference.index_shards.build_from_shards`) as IVF and IVF-PQ, and HNSW at the smallest size
  (its build is slow on a CPU); each build's time and peak memory (in a process of its own), its
  Recall@10 against exact search as stored in the index, and its queries/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

D, K = 512, 10
REPEATS = 7  # exact searches timed a method and size: the least disturbed is reported


def clustered(n: int, seed: int, centres: int = 10_000) -> torch.Tensor:
    """``n`` 512-d unit vectors in ``centres`` clusters, each spread along 16 directions of its own (a
    low intrinsic dimension, as embeddings have: near neighbours are well defined, not the near-ties of
    isotropic noise in 512-d), made in chunks."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(99)  # the same clusters for galleries and queries
    middle = torch.nn.functional.normalize(torch.randn(centres, D, generator=fixed), dim=1)
    spread = torch.randn(D, 16, generator=fixed) / 4
    out = torch.empty(n, D)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        which = torch.randint(0, centres, (stop - start,), generator=g)
        along = 0.3 * torch.randn(stop - start, 16, generator=g) @ spread.T
        noise = 0.005 * torch.randn(stop - start, D, generator=g)
        out[start:stop] = torch.nn.functional.normalize(middle[which] + along + noise, dim=1)
    return out


def timed(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- embedding --------------------------------------------------------------------------------------------
def resnet50_checkpoint(folder: Path) -> Path:
    """A checkpoint of ResNet-50 (random weights, CUB's 224 px evaluation preprocessing) in dml's format."""
    from omegaconf import OmegaConf

    from benchmarks.throughput import make_cub_layout
    from dml.builders import build_data_and_module
    from dml.config import compose

    make_cub_layout(folder / "data", per_class=1, unique=4, classes=100)
    cfg = compose(
        [
            "experiment=proxy_anchor_cub_r50",
            "backbone.pretrained=false",
            f"paths.data_dir={folder / 'data'}",
            "dataset.download=false",
            "dataset.num_train_classes=100",
        ]
    )
    _, module = build_data_and_module(cfg)
    path = folder / "resnet50.ckpt"
    torch.save(
        {"dml_config": OmegaConf.to_container(cfg, resolve=True), "state_dict": module.state_dict()}, path
    )
    return path


def embedding(args: argparse.Namespace, folder: Path) -> None:
    from benchmarks.throughput import natural_jpeg
    from dml.inference import Embedder
    from dml.inference.predicting import embed_to_shards

    images = folder / "images"
    images.mkdir(exist_ok=True)
    pictures = [natural_jpeg(seed) for seed in range(64)]
    for i in range(args.images):
        (images / f"{i:05d}.jpg").write_bytes(pictures[i % len(pictures)])
    embedder = Embedder.from_checkpoint(resnet50_checkpoint(folder), device="cpu")
    inputs = embedder.inputs(embedder.resolve(str(images)))
    # the forward pass alone on the very batches embed.py's path feeds it, decoded beforehand
    transform = embedder.file_transform()
    from PIL import Image

    batches = [
        torch.stack([transform(Image.open(p).convert("RGB")) for p in inputs.files[i : i + args.batch]])
        for i in range(0, 4 * args.batch, args.batch)
    ]

    def forward_rate() -> float:
        with torch.inference_mode():
            embedder.module(batches[0])  # warm-up
            return args.batch * len(batches) / timed(lambda: [embedder.module(b) for b in batches])

    before = forward_rate()
    start = time.perf_counter()
    embed_to_shards(
        embedder,
        inputs,
        folder / "shards",
        shard_size=100_000,
        batch_size=args.batch,
        num_workers=args.workers,
        progress=False,
    )
    embedded = args.images / (time.perf_counter() - start)
    after = forward_rate()
    forward = (before + after) / 2  # before and after: the machine's drift shows
    print(
        f"\nembedding, ResNet-50 at 224 px, batch {args.batch}, {args.workers} loader worker(s), {args.images} JPEGs of 500 x 375"
    )
    print(
        f"  forward pass alone        {forward:8.2f} images/s (the mean of {before:.2f} before, {after:.2f} after)"
    )
    print(
        f"  embed.py's path           {embedded:8.2f} images/s  ({embedded / forward:.1%} of the forward pass)"
    )


# --- exact search -----------------------------------------------------------------------------------------
def _search_times(n: int, queries: int) -> tuple[float, float, float]:
    """In a process of its own (nothing left over from another part): seconds to search ``queries``
    queries among ``n`` for dml's Index, raw faiss and PML, each the median of 5, interleaved."""
    from dml.evaluation.backends import faiss_available
    from dml.inference import Embeddings, Index

    faiss_available()
    import faiss

    q_tensor, gallery = clustered(queries, seed=1), clustered(n, seed=0)
    q = np.ascontiguousarray(q_tensor.numpy())
    raw = faiss.IndexFlatIP(D)
    raw.add(gallery.numpy())
    names = [f"item_{i}" for i in range(n)]
    ours = Index.build(Embeddings(gallery, names, torch.zeros(n, dtype=torch.long), "none", "0" * 64))
    times: dict[str, list[float]] = {"raw": [], "ours": []}
    for _ in range(REPEATS):  # interleaved, so that neither gets the quieter moments of the machine
        times["raw"].append(timed(lambda: raw.search(q, K), repeats=1))
        times["ours"].append(timed(lambda: ours.search(q_tensor, K), repeats=1))
    return min(times["ours"]), min(times["raw"]), _pml(gallery, q_tensor)


def exact_search(args: argparse.Namespace) -> None:
    print(f"\nexact search, {args.queries} queries, k={K}, 512-d, the best of {REPEATS} (queries/s)")
    print(f"{'gallery':>10}{'dml Index':>12}{'raw faiss':>12}{'dml/faiss':>11}{'PML':>10}{'OML':>16}")
    for n in args.sizes:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            t_ours, t_raw, t_pml = pool.submit(_search_times, n, args.queries).result()
        print(
            f"{n:>10,}{args.queries / t_ours:>12.1f}{args.queries / t_raw:>12.1f}{t_raw / t_ours:>11.1%}"
            f"{args.queries / t_pml:>10.1f}{'not installed':>16}"
        )


def _pml(gallery: torch.Tensor, queries: torch.Tensor) -> float:
    from pytorch_metric_learning.utils.inference import InferenceModel

    model = InferenceModel(torch.nn.Identity(), normalize_embeddings=True)
    model.train_knn(gallery, batch_size=65_536)
    return min(timed(lambda: model.get_nearest_neighbors(queries, K), repeats=1) for _ in range(REPEATS))


# --- approximate search -----------------------------------------------------------------------------------
def _peak_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build(folder: str, kind: str, params: dict[str, Any], knobs: list[int]) -> dict[str, Any]:
    """In a process of its own: build from the shards; its time, peak memory and bytes a vector; then for
    each search breadth (nprobe, or ef_search) its Recall@10 against exact search on 1,000 rows, and its
    queries/s."""
    import faiss

    from dml.inference.index_shards import _recall, build_from_shards
    from dml.inference.shards import ShardedEmbeddings

    shards = ShardedEmbeddings(folder)
    start = time.perf_counter()
    index = build_from_shards(shards, kind=kind, **params)
    seconds, peak = time.perf_counter() - start, _peak_gb()
    size = index.index.sa_code_size() if kind == "ivfpq" else D * 4
    rows = np.sort(np.random.default_rng(1).choice(len(shards), size=1000, replace=False))
    queries = clustered(len(shards), seed=0)[torch.from_numpy(rows)]  # the gallery's own rows
    curve = []
    for knob in knobs:
        if kind == "hnsw":
            index.index.hnsw.efSearch = knob
        else:
            faiss.extract_index_ivf(index.index).nprobe = knob
        recall = _recall(index, shards, rows, K, True)["recall"]
        speed = len(rows) / timed(lambda: index.search(queries, K, exclude=rows.tolist()))
        curve.append((knob, recall, speed))
    stored = index.meta["recall_vs_exact"]["recall"]
    return {"seconds": seconds, "peak": peak, "size": size, "stored": stored, "curve": curve}


def approximate(args: argparse.Namespace, folder: Path) -> None:
    from dml.inference.embeddings import Embeddings
    from dml.inference.shards import Manifest, finish_folder, names_sha256, start_folder, write_shard

    print("\napproximate search from shards: build time, peak memory of the building process, bytes a")
    print("vector; Recall@10 against exact search on 1,000 rows (each leaving itself out), queries/s")
    small, large = min(args.sizes), max(args.sizes)
    runs = [
        (large, "ivf", {"nlist": args.nlist, "nprobe": 16}, [4, 16, 64]),
        (large, "ivfpq", {"nlist": args.nlist, "nprobe": 16, "pq_m": 64}, [4, 16, 64]),
        (small, "hnsw", {"hnsw_m": 32, "ef_search": 128}, [32, 128, 512]),
    ]
    for n in sorted({n for n, _, _, _ in runs}):
        shards = folder / f"shards_{n}"
        names = [f"item_{i}" for i in range(n)]
        m = Manifest("none", "0" * 64, "cosine", D, n, names_sha256(names), 250_000)
        start_folder(shards, m, resume=False, overwrite=False)
        vectors = clustered(n, seed=0)  # the search part's gallery
        for i in range(m.shards):
            r = m.shard_range(i)
            labels = torch.zeros(len(r), dtype=torch.long)
            write_shard(
                shards,
                i,
                Embeddings(vectors[r.start : r.stop], names[r.start : r.stop], labels, "none", "0" * 64),
                m.inputs_sha256,
            )
        finish_folder(shards, m)
        del vectors
    for n, kind, params, knobs in runs:
        # a process of its own each: its peak memory is the build's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            got = pool.submit(_build, str(folder / f"shards_{n}"), kind, params, knobs).result()
        shown = f"{kind} " + ", ".join(f"{k}={v}" for k, v in params.items())
        print(
            f"{n:>10,} {shown}: built in {got['seconds']:.1f} s, peak {got['peak']:.2f} GB, "
            f"{got['size']} bytes a vector, Recall@10 stored {got['stored']:.4f}"
        )
        knob = "ef_search" if kind == "hnsw" else "nprobe"
        for value, recall, speed in got["curve"]:
            print(f"{'':>12}{knob}={value:<5} Recall@10 {recall:.4f}  {speed:9.1f} queries/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["embed", "search", "approximate"])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells of the approximate part")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        if "embed" in args.parts:
            embedding(args, Path(tmp))
        if "search" in args.parts:
            exact_search(args)
        if "approximate" in args.parts:
            approximate(args, Path(tmp))


if __name__ == "__main__":
    main()
