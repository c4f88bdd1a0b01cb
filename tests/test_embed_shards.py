"""embed.py into a folder of shards as a user runs it: killed partway and resumed, it writes exactly what
an uninterrupted run writes; on 2 CPU processes under DDP, what one process writes."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dml.inference.shards import MANIFEST, ShardedEmbeddings, load_embeddings
from tests.conftest import run_entry

pytestmark = pytest.mark.slow  # entry points in fresh interpreters, several of them


def embed(checkpoint, out, run, *args, threads=None):
    """embed.py as a user runs it; ``threads``: torch's threads a process (OMP_NUM_THREADS)."""
    common = [f"ckpt_path={checkpoint}", f"out={out}", "device=cpu", "num_workers=0"]
    return run_entry(
        "embed.py",
        [*common, *args, f"hydra.run.dir={run}"],
        env={"OMP_NUM_THREADS": str(threads)} if threads else {},
    )


def test_a_killed_run_resumes_to_exactly_what_an_uninterrupted_one_writes(checkpoint, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        pixels = rng.integers(0, 255, (24 + i % 5, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / ("sub" if i % 3 else ".") / f"{i:03d}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    common = [f"images={images}", "shard_size=8", "batch_size=4"]  # 31 inputs: 4 shards of 2 batches

    whole = embed(checkpoint, tmp_path / "whole", tmp_path / "r1", *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (
        "30 embeddings (64-d, cosine) written to" in whole.stdout
        and "1 unreadable images skipped" in whole.stdout
    )

    kill = ["+callbacks.kill._target_=tests.crash.KillAtPredictBatch", "+callbacks.kill.batch=5"]
    killed = embed(checkpoint, tmp_path / "part", tmp_path / "r2", *common, *kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not json.loads((tmp_path / "part" / MANIFEST).read_text())["complete"]
    assert sorted(p.name for p in (tmp_path / "part").glob("*.safetensors")) == [
        "shard-000000.safetensors",
        "shard-000001.safetensors",
    ]
    again = embed(checkpoint, tmp_path / "part", tmp_path / "r3", *common)
    assert (
        again.returncode == 2 and "already holds embeddings" in again.stderr and "resume=true" in again.stderr
    )
    resumed = embed(checkpoint, tmp_path / "part", tmp_path / "r4", *common, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 of 4 shards were written before" in resumed.stdout + resumed.stderr

    a, b = ShardedEmbeddings(tmp_path / "whole"), ShardedEmbeddings(tmp_path / "part")
    assert a.manifest == b.manifest
    for x, y in zip(a.shards(), b.shards(), strict=True):
        assert x.names == y.names and torch.equal(x.vectors, y.vectors) and torch.equal(x.labels, y.labels)
    one_file = embed(checkpoint, tmp_path / "one.safetensors", tmp_path / "r5", f"images={images}")
    assert one_file.returncode == 0, one_file.stderr[-3000:]
    single = load_embeddings(tmp_path / "one.safetensors")  # the single-file format still loads
    assert single.names == load_embeddings(tmp_path / "whole").names
    assert torch.allclose(single.vectors, load_embeddings(tmp_path / "whole").vectors, atol=1e-6)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo runs on Linux and macOS")
def test_two_processes_under_ddp_write_what_one_process_writes(checkpoint, tmp_path):
    common = ["images=test", "shard_size=50", "batch_size=16"]  # 180 test images: 4 shards, 2 a process
    # one thread a process in both runs (Lightning gives each DDP process its share of the cores): the
    # same sums in the same order, so the same bits
    one = embed(checkpoint, tmp_path / "one", tmp_path / "r1", *common, threads=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = embed(checkpoint, tmp_path / "two", tmp_path / "r2", *common, "devices=2", threads=1)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_embeddings(tmp_path / "one"), load_embeddings(tmp_path / "two")
    assert len(a.names) == 180 and a.names == b.names and torch.equal(a.labels, b.labels)
    assert (a.labels >= 0).all()  # a split's class ids
    assert torch.equal(a.vectors, b.vectors)
    idle = embed(checkpoint, tmp_path / "idle", tmp_path / "r3", "images=test", "shard_size=500", "devices=2")
    assert idle.returncode == 0, idle.stderr[-3000:]  # one shard: the second process has none to write
    assert load_embeddings(tmp_path / "idle").names == a.names
