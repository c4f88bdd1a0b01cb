"""Indexes built from a folder of shards (dml.inference.index_shards): IVF-PQ trained on a sample with the
vectors added shard by shard, its recall against exact search stored; names and labels in Parquet."""

import numpy as np
import pytest
import torch

from dml.errors import UserError
from dml.inference import index as index_module
from dml.inference.embeddings import Embeddings
from dml.inference.index import Index
from dml.inference.index_shards import build_from_shards
from dml.inference.shards import (
    Manifest,
    ShardedEmbeddings,
    finish_folder,
    names_sha256,
    start_folder,
    write_shard,
)

pytest.importorskip("faiss")


def shard_folder(folder, n=20_000, d=64, shard_size=6_000, seed=0):
    """``n`` unit vectors around 200 centres (clustered, as embeddings are), in shards."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(200, d, generator=g)
    labels = torch.randint(0, 200, (n,), generator=g)
    vectors = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(n, d, generator=g), dim=1)
    names = [f"img_{i:06d}.jpg" for i in range(n)]
    m = Manifest("model.ckpt", "f" * 64, "cosine", d, n, names_sha256(names), shard_size)
    start_folder(folder, m, resume=False, overwrite=False)
    for i in range(m.shards):
        r = m.shard_range(i)
        part = Embeddings(
            vectors[r.start : r.stop],
            names[r.start : r.stop],
            labels[r.start : r.stop],
            "model.ckpt",
            "f" * 64,
        )
        write_shard(folder, i, part, m.inputs_sha256)
    finish_folder(folder, m)
    return ShardedEmbeddings(folder), vectors, labels


def test_an_ivfpq_index_from_shards_stores_its_recall_and_saves_its_names_in_parquet(tmp_path):
    shards, vectors, labels = shard_folder(tmp_path / "emb")
    built = build_from_shards(shards, kind="ivfpq", nlist=64, nprobe=16, pq_m=32, recall_queries=300)
    assert len(built) == 20_000 and built.meta["params"] == {"nlist": 64, "nprobe": 16, "pq_m": 32}
    recall = built.meta["recall_vs_exact"]  # compressed 8 times: close to exact search, not exact
    assert recall["k"] == 10 and recall["queries"] == 300 and 0.6 < recall["recall"] < 1.0
    built.save(tmp_path / "index")
    assert (tmp_path / "index" / "rows.parquet").is_file()
    assert "names" not in (tmp_path / "index" / "meta.json").read_text()
    back = Index.load(tmp_path / "index", gpu=False)
    assert back.names == built.names and torch.equal(back.labels, labels)
    assert back.meta["recall_vs_exact"] == recall
    found = back.search(vectors[:50], k=5, exclude=list(range(50)))
    assert (found.ids != torch.arange(50)[:, None]).all()  # each query left out of its own answer
    assert (found.labels[:, 0] == labels[:50]).float().mean() > 0.8  # clustered: the neighbour's class


def test_an_exact_index_from_shards_answers_as_one_built_in_memory(tmp_path):
    shards, vectors, labels = shard_folder(tmp_path / "emb", n=3_000, shard_size=700)
    streamed = build_from_shards(shards, kind="flat")
    whole = Index.build(Embeddings(vectors, shards.names_and_labels()[0], labels, "model.ckpt", "f" * 64))
    a, b = streamed.search(vectors[:20], k=7), whole.search(vectors[:20], k=7)
    assert torch.equal(a.ids, b.ids) and a.names == b.names


def test_an_ivf_index_s_stored_recall_is_what_its_search_finds_against_exact_search(tmp_path):
    shards, vectors, _ = shard_folder(tmp_path / "emb", n=5_000, shard_size=1_500)
    every_cell = build_from_shards(shards, kind="ivf", nlist=32, nprobe=32, recall_queries=200)
    assert every_cell.meta["recall_vs_exact"]["recall"] == pytest.approx(1.0)  # every cell searched: exact
    one_cell = build_from_shards(shards, kind="ivf", nlist=32, nprobe=1, recall_queries=5_000)
    # every row a query (the fallback leaves none out): the stored figure against a brute-force check
    exact = (vectors @ vectors.T).fill_diagonal_(-2).topk(10, dim=1).indices
    found = one_cell.search(vectors, 10, exclude=list(range(5_000))).ids
    hits = [len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), found.tolist(), strict=True)]
    assert one_cell.meta["recall_vs_exact"]["recall"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert 0.2 < one_cell.meta["recall_vs_exact"]["recall"] < 0.99  # one cell of 32 misses some


def test_bad_settings_and_a_k_over_faiss_s_gpu_limit_are_one_message_each(tmp_path, monkeypatch):
    shards, vectors, _ = shard_folder(tmp_path / "emb", n=3_000, shard_size=1_000)
    with pytest.raises(UserError, match="pq_m=5 must divide the embedding size 64"):
        build_from_shards(shards, kind="ivfpq", pq_m=5)
    with pytest.raises(UserError, match=r"nlist=100: 3000 embeddings train 76 IVF cells at most"):
        build_from_shards(shards, kind="ivf", nlist=100)
    with pytest.raises(UserError, match="kind='ivfp' must be one of flat, ivf, ivfpq, hnsw"):
        build_from_shards(shards, kind="ivfp")
    small, _, _ = shard_folder(tmp_path / "small", n=200, shard_size=100)
    with pytest.raises(UserError, match="kind=ivfpq over 200 embeddings: .* need 256 embeddings at least"):
        build_from_shards(small, kind="ivfpq")
    flat = build_from_shards(shards, kind="flat")
    monkeypatch.setattr(index_module, "_on_gpu", lambda index: True)
    with pytest.raises(
        UserError, match=r"k=2048 is over the 2048 neighbours faiss returns from a GPU index \(one more"
    ):
        flat.search(vectors[:2], k=2048, exclude=[0, 1])
    assert np.isfinite(flat.search(vectors[:2], k=2047, exclude=[0, 1]).scores.numpy()).all()
