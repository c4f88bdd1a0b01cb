"""Using a trained model: embed, index, search and export (dml.inference and the entry points), on a
short synthetic run's checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dml.errors import UserError
from dml.evaluation.retrieval import knn
from dml.inference import Embedder, Embeddings, Index, export
from dml.tasks import evaluate
from tests.conftest import compose_config, run_entry


def evaluate_recall(checkpoint, tmp_path) -> float:
    cfg = compose_config([f"ckpt_path={checkpoint}", "trainer.accelerator=cpu"], tmp_path, name="evaluate")
    return evaluate(cfg)["test/recall@1"]


def test_searching_the_test_split_against_itself_gives_evaluate_s_neighbours(
    checkpoint, test_split, tmp_path
):
    index = Index.build(test_split)
    assert index.meta["kind"] == "flat" and len(index) == 180 and index.dim == 64
    result = index.search(test_split.vectors, k=5, exclude=range(len(index)))
    assert not (result.ids == torch.arange(len(index))[:, None]).any()  # no query finds itself
    # The evaluation's own neighbour search (torch backend) finds the same nearest neighbours ...
    torch.testing.assert_close(result.ids[:, 0], knn(test_split.vectors, k=1, backend="torch")[:, 0])
    # ... and so the same Recall@1 as evaluate.py.
    recall = (result.labels[:, 0] == test_split.labels).float().mean().item()
    assert recall == pytest.approx(evaluate_recall(checkpoint, tmp_path), abs=1e-6)
    assert result.score_name == "similarity"
    cosine = (test_split.vectors[:, None] * test_split.vectors[result.ids]).sum(-1)
    torch.testing.assert_close(result.scores, cosine, rtol=1e-4, atol=1e-4)


def write_test_images(embedder, folder, count: int = 12) -> list:
    """The test split's first images as PNG files in nested folders (lossless: the same pixels)."""
    paths = []
    for i in range(count):
        image = embedder.datamodule.splits["test"].raw_image(i)
        path = folder / f"class_{i % 3}" / "deeper" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def test_a_folder_embeds_like_the_split_and_skips_what_it_cannot_read(embedder, test_split, tmp_path):
    paths = write_test_images(embedder, tmp_path / "images")
    (tmp_path / "images" / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    embeddings = embedder.embed_folder(tmp_path / "images", batch_size=5, progress=False)
    assert [s["path"] for s in embeddings.skipped] == [str(tmp_path / "images" / "class_0" / "broken.jpg")]
    order = [embeddings.names.index(str(p.resolve())) for p in paths]
    torch.testing.assert_close(
        embeddings.vectors[order], test_split.vectors[: len(paths)], atol=1e-5, rtol=1e-5
    )
    assert (embeddings.labels == -1).all()


def test_bad_inputs_get_one_clear_message(embedder, test_split, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no image files"):
        embedder.embed_folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="none of the 1 images could be read"):
        embedder.embed_folder(tmp_path / "bad", progress=False)
    with pytest.raises(UserError, match="has no query/gallery roles"):
        embedder.embed("test:query")
    with pytest.raises(UserError, match="neither an image file, a folder, nor a split"):
        embedder.embed(str(tmp_path / "absent"))
    index = Index.build(test_split)
    with pytest.raises(UserError, match=r"queries of shape \(3, 65\) do not fit this index of 64-d"):
        index.search(torch.randn(3, 65))
    with pytest.raises(UserError, match="come from another model than this index"):
        index.search(test_split.vectors[:2], checkpoint_sha256="0" * 64)


def test_files_are_complete_or_absent_and_never_overwritten(test_split, tmp_path, monkeypatch):
    path = tmp_path / "emb.safetensors"
    test_split.save(path)
    loaded = Embeddings.load(path)
    torch.testing.assert_close(loaded.vectors, test_split.vectors)
    assert loaded.names == test_split.names and loaded.checkpoint_sha256 == test_split.checkpoint_sha256
    with pytest.raises(UserError, match="already exists"):
        test_split.save(path)

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")  # noqa: SIM115 - a partial write, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        test_split.save(tmp_path / "stopped.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.safetensors"]


def test_index_round_trips_and_approximate_indexes_report_their_recall(test_split, tmp_path):
    flat = Index.build(test_split)
    flat.save(tmp_path / "flat")
    with pytest.raises(UserError, match="already exists"):
        flat.save(tmp_path / "flat")
    flat.save(tmp_path / "flat", overwrite=True)  # an index replaces an index
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not an output of this package"):
        flat.save(tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    loaded = Index.load(tmp_path / "flat")
    assert (
        loaded.names == test_split.names and loaded.meta["checkpoint_sha256"] == test_split.checkpoint_sha256
    )
    torch.testing.assert_close(
        loaded.search(test_split.vectors[:7]).ids, flat.search(test_split.vectors[:7]).ids
    )
    for kind, params in (("ivf", {"nlist": 4, "nprobe": 4}), ("hnsw", {})):
        index = Index.build(test_split, kind=kind, recall_queries=50, **params)
        measured = index.meta["recall_vs_exact"]
        assert measured["queries"] == 18 and measured["k"] == 10  # at most a tenth of the rows held out
        assert measured["recall"] >= 0.9, (kind, measured)  # nprobe = nlist: IVF is exact here
    # One cell of eight searched: the held-out queries are not in the index they are measured on, so
    # nothing gives them a free hit, and the recall shows the misses.
    coarse = Index.build(test_split, kind="ivf", nlist=8, nprobe=1)
    assert coarse.meta["recall_vs_exact"]["recall"] < 0.99
    # Rows padded by faiss (fewer than k in the probed cell) and queries in or out of the index mix.
    own = [i if i % 2 else -1 for i in range(20)]
    result = coarse.search(test_split.vectors[:20], k=100, exclude=own)
    assert result.ids.shape == (20, 100)
    assert not any(i in row for i, row in zip(own, result.ids.tolist(), strict=True) if i >= 0)
    with pytest.raises(UserError, match="kind='lsh' must be one of flat, ivf, hnsw"):
        Index.build(test_split, kind="lsh")


def test_exports_give_the_checkpoint_s_embeddings(embedder, tmp_path):
    import onnxruntime

    written = export(embedder, tmp_path / "export")
    pre = json.loads(written["preprocessing"].read_text())
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3 and pre["resize"] == [32, 32]
    assert pre["channel_order"] == "RGB" and pre["embedding_dim"] == 64 and pre["normalized"]
    session = onnxruntime.InferenceSession(str(written["onnx"]))
    scripted = torch.jit.load(str(written["torchscript"]))
    test = embedder.datamodule.splits["test"]
    for size in (3, 5):  # the batch axis is dynamic
        images = torch.stack([test[i][0] for i in range(size)])
        expected = embedder.embed_batch(images)
        (onnx_out,) = session.run(None, {"images": images.numpy()})
        np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4)
        torch.testing.assert_close(scripted(images), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="already exists"):
        export(embedder, tmp_path / "export")


@pytest.mark.slow
def test_the_entry_points_end_to_end(checkpoint, tmp_path):
    """embed.py -> index.py -> search.py as the README runs them; search.py's Recall@1 is evaluate.py's."""
    emb, idx, out = tmp_path / "emb.safetensors", tmp_path / "index", tmp_path / "search"
    for script, args in (
        ("embed.py", [f"ckpt_path={checkpoint}", "images=test", f"out={emb}"]),
        ("index.py", [f"embeddings={emb}", f"out={idx}"]),
        ("search.py", [f"index={idx}", "query=test", "k=5", f"out={out}"]),
        ("export.py", [f"ckpt_path={checkpoint}", f"out={tmp_path / 'export'}", "formats=[onnx]"]),
    ):
        proc = run_entry(script, [*args, f"hydra.run.dir={tmp_path / script}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["results"]) == 180 and len(results["results"][0]["neighbours"]) == 5
    assert results["metrics"]["recall@1"] == pytest.approx(evaluate_recall(checkpoint, tmp_path), abs=1e-6)
    page = (out / "results.html").read_text()
    assert page.count("data:image/png;base64,") == 50 * 6  # 50 queries shown, each with 5 neighbours
    # A second run into the same file is refused and leaves it as it was.
    before = emb.read_bytes()
    proc = run_entry(
        "embed.py",
        [f"ckpt_path={checkpoint}", "images=test", f"out={emb}", f"hydra.run.dir={tmp_path / 'again'}"],
    )
    assert proc.returncode == 2 and "already exists" in proc.stderr and emb.read_bytes() == before


def test_a_split_is_read_through_the_checkpoint_s_own_pipeline(checkpoint, test_split, tmp_path):
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert payload["dml_config"]["dataset"]["pipeline"] in ("auto", "classic")
    assert Embedder.from_checkpoint(checkpoint, device="cpu").datamodule.pipeline == "classic"  # on a CPU
    payload["dml_config"]["dataset"]["pipeline"] = "fast"  # trained through the fast path
    fast_checkpoint = tmp_path / "fast.ckpt"
    torch.save(payload, fast_checkpoint)
    fast = Embedder.from_checkpoint(fast_checkpoint, device="cpu")
    assert fast.datamodule.pipeline == "fast", "the checkpoint's choice, as evaluate.py makes it"
    vectors = fast.embed_split("test", progress=False).vectors  # decoded by the datamodule's decode()
    # the same images, JPEG-encoded on the synthetic fast path: close to the classic embeddings, not equal
    similarity = (vectors * test_split.vectors).sum(1)
    assert vectors.shape == test_split.vectors.shape and 0.8 < similarity.mean() < 0.999
    chosen = Embedder.from_checkpoint(fast_checkpoint, device="cpu", pipeline="classic")
    assert chosen.datamodule.pipeline == "classic"
