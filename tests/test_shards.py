"""The folder of embedding shards (dml.inference.shards): two million names through it, and one clear
message for each way a folder can be wrong."""

import json

import pytest
import torch

from dml.errors import UserError
from dml.inference.embeddings import Embeddings
from dml.inference.shards import (
    MANIFEST,
    Manifest,
    ShardedEmbeddings,
    finish_folder,
    load_embeddings,
    names_sha256,
    start_folder,
    write_shard,
)


def manifest(names, shard_size, dim=4, sha="a" * 64):
    return Manifest("model.ckpt", sha, "cosine", dim, len(names), names_sha256(names), shard_size)


def part(names, dim=4, sha="a" * 64, start=0):
    vectors = torch.arange(start * dim, (start + len(names)) * dim, dtype=torch.float32).reshape(-1, dim)
    labels = torch.arange(start, start + len(names)) % 1000
    return Embeddings(vectors, list(names), labels, "model.ckpt", sha)


def written(folder, names, shard_size, **kwargs):
    m = manifest(names, shard_size)
    start_folder(folder, m, resume=False, overwrite=False)
    for i in range(m.shards):
        covered = m.shard_range(i)
        write_shard(
            folder,
            i,
            part(names[covered.start : covered.stop], start=covered.start, **kwargs),
            m.inputs_sha256,
        )
    return m


def test_two_million_names_go_through_the_shards_and_come_back_in_order(tmp_path):
    names = [f"catalogue/{i // 1000:04d}/item_{i:07d}.jpg" for i in range(2_000_000)]  # ~80 MB of names
    m = written(tmp_path / "emb", names, shard_size=700_000)
    done = finish_folder(tmp_path / "emb", m)
    assert done.complete and done.count == 2_000_000 and done.shards == 3
    back = ShardedEmbeddings(tmp_path / "emb")
    assert len(back) == 2_000_000 and [len(s.names) for s in back.shards()] == [700_000, 700_000, 600_000]
    whole = load_embeddings(tmp_path / "emb")
    assert whole.names == names
    assert torch.equal(whole.vectors[1_234_567], torch.arange(4) + 1_234_567 * 4.0)
    assert torch.equal(whole.labels, torch.arange(2_000_000) % 1000)


def test_a_damaged_folder_names_the_shard_and_what_to_do(tmp_path):
    names = [f"img_{i}.png" for i in range(10)]
    folder = tmp_path / "emb"
    m = written(folder, names, shard_size=4)
    with pytest.raises(UserError, match=r"is unfinished: 3 of its 3 shards are written.*resume=true"):
        ShardedEmbeddings(folder)
    finish_folder(folder, m)
    ShardedEmbeddings(folder)  # whole: opens

    (folder / "shard-000001.parquet").rename(tmp_path / "kept")
    with pytest.raises(UserError, match=r"shard 1 of .* is missing \(shard-000001.parquet\)"):
        ShardedEmbeddings(folder)
    (tmp_path / "kept").rename(folder / "shard-000001.parquet")

    vectors = folder / "shard-000002.safetensors"
    good = vectors.read_bytes()
    vectors.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"shard 2 of .* is damaged .*embed again"):
        ShardedEmbeddings(folder)
    vectors.write_bytes(good)

    write_shard(folder, 1, part(names[4:8], sha="b" * 64), m.inputs_sha256)
    with pytest.raises(UserError, match=r"shard 1 of .* were made by another model than model.ckpt"):
        ShardedEmbeddings(folder)
    write_shard(folder, 1, part(names[4:8], dim=8), m.inputs_sha256)
    with pytest.raises(
        UserError,
        match=r"shard 1 of .* holds vectors of shape \(4, 8\).*4-d: a folder holds shards of one size",
    ):
        ShardedEmbeddings(folder)


def test_a_shard_that_stopped_halfway_counts_as_absent(tmp_path):
    names = [f"img_{i}.png" for i in range(8)]
    folder = tmp_path / "emb"
    m = written(folder, names, shard_size=4)
    (folder / "shard-000001.safetensors").unlink()  # stopped between its names and its vectors
    assert start_folder(folder, m, resume=True, overwrite=False) == {0}
    with pytest.raises(UserError, match=r"shards \[1\] of .* are not written: finish it .* resume=true"):
        finish_folder(folder, m)


def test_starting_a_folder_refuses_what_would_lose_or_mix_work(tmp_path):
    names = [f"img_{i}.png" for i in range(8)]
    folder = tmp_path / "emb"
    m = written(folder, names, shard_size=4)
    with pytest.raises(
        UserError, match="already holds embeddings; choose another folder, set overwrite=true"
    ):
        start_folder(folder, m, resume=False, overwrite=False)
    with pytest.raises(
        UserError, match=r"resume=true with another checkpoint: .* was started with model.ckpt"
    ):
        start_folder(folder, manifest(names, 4, sha="c" * 64), resume=True, overwrite=False)
    with pytest.raises(
        UserError, match="resume=true with other images: .* was started with 8 images and they are 7"
    ):
        start_folder(folder, manifest(names[:7], 4), resume=True, overwrite=False)
    with pytest.raises(UserError, match="resume=true with shard_size=2: .* was started with 4"):
        start_folder(folder, manifest(names, 2), resume=True, overwrite=False)
    finish_folder(folder, m)
    with pytest.raises(UserError, match="is finished already .*nothing to resume"):
        start_folder(folder, m, resume=True, overwrite=False)
    assert start_folder(folder, manifest(names, 2), resume=False, overwrite=True) == set()
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST]  # the old shards went
    assert json.loads((folder / MANIFEST).read_text())["shard_size"] == 2
    with pytest.raises(UserError, match="holds no unfinished embeddings"):
        start_folder(tmp_path / "none", m, resume=True, overwrite=False)
