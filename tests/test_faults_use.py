"""Bad input at embed.py, index.py, search.py and export.py (in-process: the task functions the entry
points call): one message naming the key, value or file, and nothing written or worked on before it."""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch

from dml.errors import UserError
from dml.inference import Embedder, Embeddings, Index, SearchResult, export
from dml.use import _print, embed_task, export_task, index_task, search_task
from tests.conftest import compose_config, read_only


def task_config(name, tmp_path, *overrides):
    return compose_config(list(overrides), tmp_path, name=name)


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading or embedding fails the test: the refusal must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work was done before the refusal")

    monkeypatch.setattr(Embedder, "from_checkpoint", classmethod(forbidden))
    monkeypatch.setattr(Embedder, "embed", forbidden)


@pytest.fixture
def no_embedding(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("images were embedded before the refusal")

    monkeypatch.setattr(Embedder, "embed", forbidden)


# --- embed.py: out= is checked before the model runs (case 4) -------------------------------------------


def test_embed_refuses_a_folder_of_other_files_even_with_overwrite_before_any_work(
    checkpoint, tmp_path, no_work
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    cfg = task_config(
        "embed", tmp_path, f"ckpt_path={checkpoint}", f"out={tmp_path / 'out'}", "overwrite=true"
    )
    with pytest.raises(UserError, match=r"out='.*/out' holds other files and no embeddings.json: refusing"):
        embed_task(cfg)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_embed_refuses_a_read_only_folder_before_any_work(checkpoint, tmp_path, no_work):
    (tmp_path / "shared").mkdir()
    cfg = task_config(
        "embed", tmp_path, f"ckpt_path={checkpoint}", f"out={tmp_path / 'shared' / 'e.safetensors'}"
    )
    with (
        read_only(tmp_path / "shared"),
        pytest.raises(UserError, match=r"cannot be written.*Read-only file system"),
    ):
        embed_task(cfg)
    assert list((tmp_path / "shared").iterdir()) == []


@pytest.mark.parametrize(
    "limit, message",
    [
        ("disk", r"needs about 47,520 bytes and .* has 1,000 bytes free; free disk space"),
        ("ulimit", r"over this process's file-size limit of 1,000 bytes \(ulimit -f\)"),
    ],
)
def test_embed_refuses_an_output_that_will_not_fit_before_embedding(
    checkpoint, tmp_path, monkeypatch, no_embedding, limit, message
):
    from collections import namedtuple

    import dml.io

    if limit == "disk":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(dml.io.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    else:
        monkeypatch.setattr(dml.io.resource, "getrlimit", lambda which: (1000, 1000))
    out = tmp_path / "e.safetensors"
    cfg = task_config("embed", tmp_path, f"ckpt_path={checkpoint}", "images=test", f"out={out}")
    with pytest.raises(UserError, match=message):  # 180 test images x (64 floats + a label)
        embed_task(cfg)
    assert not out.exists()


def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_nothing(test_split, tmp_path, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")  # noqa: SIM115 - half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match=r"could not write .*e.safetensors \(No space left on device\)"):
        test_split.save(tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_embed_checks_its_numbers_before_any_work(checkpoint, tmp_path, no_work):
    for args, message in (
        (["batch_size=0"], "batch_size=0 must be a whole number, 1 or more"),
        (["num_workers=-1"], "num_workers=-1 must be a whole number, 0 or more"),
    ):
        cfg = task_config("embed", tmp_path, f"ckpt_path={checkpoint}", f"out={tmp_path / 'e'}", *args)
        with pytest.raises(UserError, match=message):
            embed_task(cfg)


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "device='gpu' is not a device: use auto, cpu, cuda"), ("cuda", "no CUDA GPU is visible here")],
)
def test_a_device_this_machine_lacks_is_one_message(checkpoint, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=message):
        Embedder.from_checkpoint(checkpoint, device=device)


# --- index.py (case 9) ---------------------------------------------------------------------------------


def test_an_approximate_index_over_one_embedding_is_one_message(test_split):
    one = Embeddings(test_split.vectors[:1], test_split.names[:1], test_split.labels[:1], "c", "0" * 64)
    for kind in ("hnsw", "ivf"):
        with pytest.raises(UserError, match=f"kind={kind} over 1 embedding: .* use kind=flat"):
            Index.build(one, kind=kind)
    assert len(Index.build(one)) == 1


def test_a_tiny_ivf_gets_an_nlist_that_works_and_is_told_one(test_split, tmp_path):
    small = Embeddings(test_split.vectors[:20], test_split.names[:20], test_split.labels[:20], "c", "0" * 64)
    assert Index.build(small, kind="ivf").meta["params"]["nlist"] == 1  # 19 to train on: one cell
    with pytest.raises(
        UserError, match=r"nlist=30: .* trained on the 18 embeddings left once 2 are held out"
    ) as e:
        Index.build(small, kind="ivf", nlist=30)
    suggested = int(re.search(r"give nlist=(\d+) or less", str(e.value)).group(1))
    assert Index.build(small, kind="ivf", nlist=suggested).meta["params"]["nlist"] == suggested
    with pytest.raises(UserError, match="nprobe='x' must be a whole number"):
        Index.build(small, kind="ivf", nprobe="x")


def test_index_checks_its_out_before_reading_the_embeddings(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    cfg = task_config(
        "index",
        tmp_path,
        f"embeddings={tmp_path / 'absent.safetensors'}",
        f"out={tmp_path / 'photos'}",
        "overwrite=true",
    )
    with pytest.raises(UserError, match="not an output of this package"):
        index_task(cfg)


# --- search.py (cases 3, 6, 9, 10) ---------------------------------------------------------------------


def search_config(tmp_path, index, *overrides):
    return task_config(
        "search", tmp_path, f"index={index}", "query=test", f"out={tmp_path / 'out'}", *overrides
    )


def test_ivf_padding_is_never_a_neighbour_and_the_shortfall_is_said(test_split, tmp_path):
    index = Index.build(test_split, kind="ivf", nlist=8, nprobe=1)
    result = index.search(test_split.vectors[:40], k=100)
    padded = result.ids < 0
    assert padded.any(), "one cell of eight cannot hold 100 neighbours for every query"
    assert torch.isnan(result.scores[padded]).all() and not torch.isnan(result.scores[~padded]).any()
    assert (result.found == (~padded).sum(1)).all()
    index.save(tmp_path / "ivf")
    metrics = search_task(search_config(tmp_path, tmp_path / "ivf", "k=100", "print_queries=0"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    neighbours = [n for row in results["results"] for n in row["neighbours"]]
    assert all(n["name"] and -1.0001 <= n["similarity"] <= 1.0001 for n in neighbours)
    assert any(len(row["neighbours"]) < 100 for row in results["results"])
    assert "queries got fewer than 100 neighbours" in results["notes"][0] and "nprobe" in results["notes"][0]
    assert 0 < metrics["recall@1"] <= 1


def test_search_checks_k_and_out_before_any_work(test_split, tmp_path, no_work):
    Index.build(test_split).save(tmp_path / "flat")
    for k, message in (
        ("abc", "k='abc' must be a whole number, 1 or more"),
        ("0", "k=0 must be a whole number"),
    ):
        with pytest.raises(UserError, match=message):
            search_task(search_config(tmp_path, tmp_path / "flat", f"k={k}"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="out=.*afile' is a file; give a folder"):
        search_task(search_config(tmp_path, tmp_path / "flat", f"out={tmp_path / 'afile'}"))


def test_a_k_over_faiss_s_gpu_limit_is_refused_before_the_queries_are_embedded(
    test_split, tmp_path, no_work, monkeypatch
):
    from dml.inference import index as index_module

    Index.build(test_split).save(tmp_path / "flat")
    monkeypatch.setattr(index_module, "_on_gpu", lambda index: True)  # as Index.load puts it on a GPU
    with pytest.raises(UserError, match="k=3000 is over the 2048 neighbours faiss returns from a GPU index"):
        search_task(search_config(tmp_path, tmp_path / "flat", "k=3000"))


def test_a_large_k_is_said_and_the_page_stays_small(test_split, tmp_path, caplog):
    Index.build(test_split).save(tmp_path / "flat")
    cfg = search_config(
        tmp_path, tmp_path / "flat", "k=5000", "html_queries=3", "html_neighbours=4", "print_queries=0"
    )
    search_task(cfg)
    assert "k=5000 is more than the 179 items the index can return: each query gets 179" in caplog.text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["results"][0]["neighbours"]) == 179, "results.json has every neighbour"
    page = (tmp_path / "out" / "results.html").read_text()
    assert page.count("<td") == page.count("data:image/png;base64,") == 3 * (1 + 4)
    assert "each with its first 4 of 179 neighbours" in page


def test_file_names_print_as_they_are_not_as_markup(test_split, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no folding of the names
    names = ["/photos/photo [final] v2.png", "/photos/[red]alert.png"]
    queries = Embeddings(test_split.vectors[:2], names, torch.tensor([-1, -1]), "c", "0" * 64)
    result = SearchResult(
        torch.tensor([[1], [0]]),
        torch.tensor([[0.5], [0.5]]),
        [[names[1]], [names[0]]],
        torch.tensor([[-1], [-1]]),
        "similarity",
    )
    _print(queries, result, {}, limit=2)
    shown = capsys.readouterr().out
    assert "photo [final] v2.png" in shown and "[red]alert.png" in shown


def test_formats_as_one_string_is_one_format(embedder, tmp_path):
    written = export(embedder, tmp_path / "one", formats="torchscript")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "model.torchscript.pt",
        "preprocessing.json",
    ]
    assert set(written) == {"torchscript", "preprocessing"}
    with pytest.raises(UserError, match=r"formats=\['o', 'n'\]: choose from onnx, torchscript"):
        export(embedder, tmp_path / "two", formats=["o", "n"])


def test_export_checks_formats_and_out_before_reading_the_checkpoint(checkpoint, tmp_path, no_work):
    cfg = task_config(
        "export", tmp_path, f"ckpt_path={checkpoint}", "formats=tflite", f"out={tmp_path / 'x'}"
    )
    with pytest.raises(UserError, match=r"formats=\['tflite'\]"):
        export_task(cfg)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("mine")
    cfg = task_config(
        "export", tmp_path, f"ckpt_path={checkpoint}", f"out={tmp_path / 'x'}", "overwrite=true"
    )
    with pytest.raises(UserError, match="not an output of this package"):
        export_task(cfg)


# --- a checkpoint whose dataset moved (case 6) ---------------------------------------------------------


@pytest.fixture(scope="module")
def moved_cub(tmp_path_factory):
    """A one-epoch CUB-fixture run whose data then moved: (checkpoint, old data folder, new one)."""
    from dml.config import compose
    from dml.tasks import train
    from tests.benchmark_fixtures import make_cub, tiny_cub
    from tests.conftest import FAST_RUN

    base = tmp_path_factory.mktemp("moved")
    make_cub(base / "data" / "cub")
    overrides = [
        *tiny_cub(base / "data"),
        "backbone=timm_test",
        "trainer.max_epochs=1",
        *FAST_RUN[1:],
        "~logger",
    ]
    train(compose(overrides, output_dir=base / "run"))
    (base / "data").rename(base / "moved")
    return base / "run" / "checkpoints" / "last.ckpt", base / "data", base / "moved" / "cub"


def test_a_moved_dataset_is_not_downloaded_again_and_dataset_root_is_named(moved_cub):
    checkpoint, old, new = moved_cub
    embedder = Embedder.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(
        UserError,
        match=rf"images=test needs the dataset cub .* {old / 'cub'} is not there now: give its folder with dataset_root=",
    ):
        embedder.embed("test", progress=False)
    assert not old.exists(), "the old folder is not made again"
    moved = Embedder.from_checkpoint(checkpoint, device="cpu", dataset_root=str(new)).embed(
        "test", progress=False
    )
    assert len(moved.names) == 12
    with pytest.raises(UserError, match="dataset_root='.*nowhere' is not a folder"):
        Embedder.from_checkpoint(checkpoint, device="cpu", dataset_root=str(new.parent / "nowhere"))


def test_search_needing_a_moved_dataset_refuses_before_writing_and_can_run_again(
    moved_cub, tmp_path, monkeypatch
):
    checkpoint, old, new = moved_cub
    monkeypatch.chdir(checkpoint.parent)  # the checkpoint given by a relative path ...
    gallery = Embedder.from_checkpoint("last.ckpt", device="cpu", dataset_root=str(new)).embed(
        "test", progress=False
    )
    Index.build(gallery).save(tmp_path / "index")
    monkeypatch.chdir(tmp_path)  # ... is found from any other folder
    query = next((new / "CUB_200_2011" / "images").rglob("*.jpg"))
    cfg = search_config(tmp_path, tmp_path / "index", f"query={query}", "k=3")
    with pytest.raises(
        UserError, match="thumbnails of the index's dataset images .* give its folder with dataset_root="
    ):
        search_task(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
    search_task(search_config(tmp_path, tmp_path / "index", f"query={query}", "k=3", f"dataset_root={new}"))
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "results.html").is_file()


def test_a_gpu_this_machine_lacks_is_one_message(monkeypatch):
    from dml.inference.embedder import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match=r"device='cuda:1' but this machine has 1 GPU\(s\), numbered from 0"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_output_replaced_by_a_write_that_fails_at_the_last_step_comes_back(tmp_path, monkeypatch, kind):
    import os

    import dml.io

    path = tmp_path / ("index" if kind == "folder" else "embeddings.safetensors")
    old = path / "meta.json" if kind == "folder" else path
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(b"the finished output")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        # a folder: the old one moved aside, then the new one's rename is interrupted; a file: one rename
        if len(calls) == (2 if kind == "folder" else 1):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(dml.io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), dml.io.atomic_path(path) as tmp:
        if kind == "folder":
            tmp.mkdir()
            (tmp / "meta.json").write_bytes(b"the new output")
        else:
            tmp.write_bytes(b"the new output")
    monkeypatch.setattr(dml.io.os, "replace", real)
    assert old.read_bytes() == b"the finished output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "nothing half-written beside it"
