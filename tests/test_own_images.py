"""dataset=folder and dataset=table: a user's own images trained on, evaluated, embedded and searched; the
split by class, kept with the run; bad input refused with one clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dml.command import find_user_error
from dml.config import compose
from dml.data import FolderDataModule, TableDataModule
from dml.errors import UserError
from dml.inference import Embedder
from dml.tasks import evaluate, train
from tests.conftest import FAST_RUN
from tests.own_images import CLASSES, TINY, make_folder, make_table, oml_rows


def run_config(tmp_path: Path, *overrides: str, name: str = "run", task: str = "train"):
    return compose([*FAST_RUN[1:], *TINY, "~logger", *overrides], name=task, output_dir=tmp_path / name)


def prepared(cfg_dataset) -> FolderDataModule | TableDataModule:
    datamodule = instantiate(cfg_dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def folder_module(root: Path, tmp_path: Path, *overrides: str):
    return prepared(run_config(tmp_path, "dataset=folder", f"dataset.root={root}", *overrides).dataset)


def class_names(datamodule, split: str) -> set[str]:
    ids = {i: name for name, i in datamodule.split_description()["class_ids"].items()}
    labels = datamodule.splits[split].labels if split != "train" else None
    if labels is None:  # training labels are remapped: read the raw ids
        return set(datamodule.split_description()["classes"]["train"])
    return {ids[int(i)] for i in torch.unique(labels)}


# --- the split --------------------------------------------------------------------------------------


def test_a_folder_s_split_is_by_class_seeded_and_reported(tmp_path, caplog):
    files = make_folder(tmp_path / "data")
    first = folder_module(tmp_path / "data", tmp_path)
    again = folder_module(tmp_path / "data", tmp_path)
    other = folder_module(tmp_path / "data", tmp_path, "dataset.split_seed=1")
    split = first.split_description()["classes"]
    assert set(split["train"]) | set(split["test"]) == set(CLASSES) and not set(split["train"]) & set(
        split["test"]
    )
    assert len(split["test"]) == 4  # test_classes: 0.5
    assert split == again.split_description()["classes"] and split != other.split_description()["classes"]
    assert class_names(first, "test") == set(split["test"])
    assert len(first.splits["train"]) == sum(len(files[name]) for name in split["train"])
    assert first.num_train_classes == 4
    val = folder_module(tmp_path / "data", tmp_path, "dataset.val_classes=2", "dataset.test_classes=3")
    classes = val.split_description()["classes"]
    assert [len(classes[s]) for s in ("train", "val", "test")] == [3, 2, 3]
    assert class_names(val, "val") == set(classes["val"])


def test_a_split_file_places_every_class(tmp_path):
    make_folder(tmp_path / "data")
    given = {name: "test" if i < 3 else "val" if i == 3 else "train" for i, name in enumerate(CLASSES)}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(given), encoding="utf-8")
    datamodule = folder_module(tmp_path / "data", tmp_path, f"dataset.split_file={split_file}")
    classes = datamodule.split_description()["classes"]
    assert set(classes["test"]) == set(CLASSES[:3]) and classes["val"] == [CLASSES[3]]
    csv_file = tmp_path / "split.csv"
    csv_file.write_text("class,split\n" + "".join(f'"{k}",{v}\n' for k, v in given.items()), encoding="utf-8")
    from_csv = folder_module(tmp_path / "data", tmp_path, f"dataset.split_file={csv_file}")
    assert from_csv.split_description()["classes"] == classes


def test_small_classes_leave_training_and_singletons_leave_every_split(tmp_path, caplog):
    root = tmp_path / "data"
    make_folder(root, CLASSES[:6])
    make_folder(root, ["tiny one"], per_class=1, start=900)
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps({n: "train" if i % 2 else "test" for i, n in enumerate([*CLASSES[:6], "tiny one"])})
    )
    datamodule = folder_module(
        root,
        tmp_path,
        f"dataset.split_file={split_file}",
        "dataset.samples_per_class=3",
        "dataset.batch_size=6",
    )
    assert "tiny one" in datamodule.split_description()["classes"]["dropped"]
    assert "fewer than 3 images" in caplog.text or "single image" in caplog.text
    with pytest.raises(UserError, match="a batch needs 4"):
        folder_module(
            root,
            tmp_path,
            f"dataset.split_file={split_file}",
            "dataset.samples_per_class=7",
            "dataset.batch_size=28",
        )


def test_the_same_image_in_train_and_test_is_reported(tmp_path, caplog):
    files = make_folder(tmp_path / "data")
    datamodule = folder_module(tmp_path / "data", tmp_path)
    train_name, test_name = (datamodule.split_description()["classes"][s][0] for s in ("train", "test"))
    shutil.copy(tmp_path / "data" / files[train_name][0], tmp_path / "data" / test_name / "copy.jpg")
    folder_module(tmp_path / "data", tmp_path)
    assert "have the same content as training images" in caplog.text and "copy.jpg" in caplog.text


def test_preparation_is_kept_until_the_folder_changes(tmp_path, monkeypatch):
    import dml.data.datasets.custom as custom

    make_folder(tmp_path / "data")
    folder_module(tmp_path / "data", tmp_path)
    checked = []
    monkeypatch.setattr(custom, "check_image", lambda path: checked.append(path) or "x")
    folder_module(tmp_path / "data", tmp_path)
    assert not checked  # the index's stamp is the folder's
    make_folder(tmp_path / "data", ["new class"], start=500)
    folder_module(tmp_path / "data", tmp_path)
    assert len(checked) == 6 * (len(CLASSES) + 1)


# --- training, evaluation, embedding, searching -----------------------------------------------------


def test_a_folder_trains_evaluates_embeds_and_searches_with_its_stored_split(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    metrics = train(run_config(tmp_path, "dataset=folder", f"dataset.root={root}", "trainer.max_epochs=1"))
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    assert 0 <= metrics["test/recall@1"] <= 1 and len(split["classes"]["test"]) == 4
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["FolderDataModule"]["split"]

    # a class added since: the run's split is kept
    make_folder(root, ["added later"], start=700)
    evaluated = evaluate(compose([f"ckpt_path={ckpt}"], name="evaluate", output_dir=tmp_path / "evaluation"))
    assert evaluated["test/recall@1"] == pytest.approx(metrics["test/recall@1"])
    embedder = Embedder.from_checkpoint(ckpt, device="cpu")
    test = embedder.embed_split("test", progress=False)
    names = {name for name, i in split["class_ids"].items() if i in set(test.labels.tolist())}
    assert names == set(split["classes"]["test"])
    found = embedder.embed_files([root / split["classes"]["test"][0] / "image 0.jpg"], progress=False)
    assert found.vectors.shape == (1, test.vectors.shape[1])


def test_a_table_in_open_metric_learning_s_format_evaluates_queries_against_the_gallery(tmp_path):
    files = make_folder(tmp_path / "images")
    test = CLASSES[:3]
    table = make_table(tmp_path / "images" / "df.csv", oml_rows(files, test))
    train(run_config(tmp_path, "dataset=table", f"dataset.table={table}", "trainer.max_epochs=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # evaluate.py's figure, against a brute force over the vectors embed.py writes (the Embedder's)
    metrics = evaluate(compose([f"ckpt_path={ckpt}"], name="evaluate", output_dir=tmp_path / "evaluation"))
    embedder = Embedder.from_checkpoint(ckpt, device="cpu")
    split = embedder.require_dataset("the test").splits["test"]
    roles = split.roles
    assert roles is not None and int((roles == 0).sum()) == 2 * len(test)
    vectors = embedder.embed_split("test", progress=False)
    x, y = vectors.vectors, vectors.labels
    query, gallery = roles == 0, roles == 1
    nearest = (x[query] @ x[gallery].T).argmax(1)
    brute = (y[gallery][nearest] == y[query]).float().mean().item()
    assert metrics["test/recall@1"] == pytest.approx(brute, abs=1e-6)
    assert json.loads((tmp_path / "run" / "split.json").read_text())["classes"]["test"] == sorted(
        str(i) for i in range(3)
    )


def test_a_parquet_table_with_names_and_a_root_reads_as_its_csv(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    files = make_folder(tmp_path / "images")
    rows = [{"path": p, "label": name} for name, paths in files.items() for p in paths]
    table = tmp_path / "tables" / "items.parquet"
    table.parent.mkdir()
    pq.write_table(pyarrow.Table.from_pylist(rows), table)
    cfg = run_config(
        tmp_path, "dataset=table", f"dataset.table={table}", f"dataset.root={tmp_path / 'images'}"
    )
    from_parquet = prepared(cfg.dataset)
    csv_table = make_table(tmp_path / "tables" / "items.csv", rows)
    cfg = run_config(
        tmp_path, "dataset=table", f"dataset.table={csv_table}", f"dataset.root={tmp_path / 'images'}"
    )
    assert from_parquet.split_description()["classes"] == prepared(cfg.dataset).split_description()["classes"]


# --- bad input --------------------------------------------------------------------------------------


def _table(tmp_path: Path, rows, columns: list[str] | None = None) -> list[str]:
    """A table in the folder of :func:`_rows`' images: ``rows`` a list, or a function of _rows()."""
    rows = rows(_rows(tmp_path)) if callable(rows) else rows
    return ["dataset=table", f"dataset.table={make_table(tmp_path / 'data' / 't.csv', rows, columns)}"]


def _rows(tmp_path: Path) -> list[dict]:
    """Eight good rows (rows 2-9 of the table): four classes of two images."""
    files = make_folder(tmp_path / "data", CLASSES[:4], per_class=2)
    return [{"path": path, "label": name} for name, paths in files.items() for path in paths]


BAD = {
    "missing root": (lambda t: ["dataset=folder", f"dataset.root={t / 'nowhere'}"], "is not a folder"),
    "no root": (lambda t: ["dataset=folder"], "needs dataset.root"),
    "empty root": (
        lambda t: (t / "empty").mkdir() or ["dataset=folder", f"dataset.root={t / 'empty'}"],
        "no class subfolders",
    ),
    "one class": (
        lambda t: make_folder(t / "d", CLASSES[:1]) and ["dataset=folder", f"dataset.root={t / 'd'}"],
        "has 1 class",
    ),
    "classes with one image": (
        lambda t: (
            make_folder(t / "d", CLASSES[:4], per_class=1) and ["dataset=folder", f"dataset.root={t / 'd'}"]
        ),
        "has a single image",
    ),
    "an unreadable image": (
        lambda t: (
            make_folder(t / "d")
            and (t / "d" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            and ["dataset=folder", f"dataset.root={t / 'd'}"]
        ),
        "broken.jpg",
    ),
    "a missing column": (lambda t: _table(t, [{"file": "a.jpg", "label": 1}]), "has no path column"),
    "a path that does not exist": (
        lambda t: _table(t, lambda rows: [*rows, {"path": "cat/gone.jpg", "label": "cat"}]),
        "row 10: ",
    ),
    "an empty label": (
        lambda t: _table(t, lambda rows: [*rows, {"path": "dog/x.jpg", "label": ""}]),
        "row 10: the label is empty",
    ),
    "duplicate rows": (lambda t: _table(t, lambda rows: [*rows, rows[0]]), "rows 2 and 10 both list"),
    "a class in two splits": (
        lambda t: _table(
            t, lambda rows: [{**r, "split": "test" if i == 1 else "train"} for i, r in enumerate(rows)]
        ),
        "puts class 'Blue Jay' in both",
    ),
    "a split file naming unknown classes": (
        lambda t: (
            make_folder(t / "d", CLASSES[:4])
            and (t / "s.json").write_text(
                json.dumps({**{c: "train" for c in CLASSES[:3]}, CLASSES[3]: "test", "owl": "test"})
            )
            and ["dataset=folder", f"dataset.root={t / 'd'}", f"dataset.split_file={t / 's.json'}"]
        ),
        "names classes",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_naming_what_to_fix_and_leaves_nothing_partial(tmp_path, case):
    overrides, message = BAD[case]
    with pytest.raises(Exception) as caught:  # Hydra wraps what the constructor raises
        prepared(run_config(tmp_path, *overrides(tmp_path)).dataset)
    error = find_user_error(caught.value)
    assert error is not None and message in str(error), str(caught.value)
    # nothing half-written: an index is only there when the check of every file finished
    for index in [*tmp_path.rglob("dml_index.json"), *tmp_path.rglob("*.dml_index.json")]:
        assert json.loads(index.read_text())["format"] == "dml custom index 1"
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name], "a temporary file was left behind"


def test_skip_bad_images_leaves_out_unreadable_ones_with_a_count(tmp_path, caplog):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    datamodule = folder_module(tmp_path / "d", tmp_path, "dataset.skip_bad_images=true")
    assert "left out 1 missing or unreadable" in caplog.text
    assert sum(len(s) for name, s in datamodule.splits.items() if name in ("train", "test")) == 6 * len(
        CLASSES
    )


def test_a_folder_takes_the_fast_path_the_resized_cache_and_the_random_sampler(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    metrics = train(
        run_config(
            tmp_path,
            "dataset=folder",
            f"dataset.root={root}",
            "dataset.pipeline=fast",
            "dataset.resized_cache=true",
            "dataset.sampler=random",
            "trainer.max_epochs=1",
        )
    )
    assert 0 <= metrics["test/recall@1"] <= 1
    assert (root / ".dml_resized_36" / "complete.json").is_file()
    again = folder_module(root, tmp_path)  # the copy is not taken for a class folder
    assert (
        again.split_description()["classes"]
        == json.loads((tmp_path / "run" / "split.json").read_text())["classes"]
    )


def test_the_image_preset_trains_a_folder_with_its_own_settings(tmp_path):
    cfg = run_config(tmp_path, "dataset=folder", f"dataset.root={tmp_path}", "preset=imagenet_finetune")
    assert (
        cfg.dataset._target_ == "dml.data.FolderDataModule"
        and cfg.optimizer.lr == compose(["dataset=cub", "preset=imagenet_finetune"]).optimizer.lr
    )
    assert cfg.dataset.num_train_classes is None and cfg.loss.num_classes is None  # read from the data


@pytest.mark.slow  # make, then five entry points
def test_make_train_on_a_folder_then_every_command_on_its_checkpoint_with_no_extra_flags(tmp_path):
    from tests.conftest import run_entry
    from tests.test_benchmarks import make_command

    root = tmp_path / "my_images"
    make_folder(root)
    run = tmp_path / "run"
    settings = [*TINY, "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=no_progress"]
    trained = make_command(
        "train",
        DATA="folder",
        ARGS=" ".join([f"hydra.run.dir={run}", *settings, "trainer.enable_progress_bar=false"]),
        **{"dataset.root": str(root)},  # a make variable, forwarded as the override
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    steps = [
        ("evaluate.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={out / 'evaluation'}"]),
        ("embed.py", [f"ckpt_path={ckpt}", "images=test", f"out={out / 'test.safetensors'}"]),
        ("index.py", [f"embeddings={out / 'test.safetensors'}", f"out={out / 'index'}"]),
        ("search.py", [f"index={out / 'index'}", "query=test", "k=3", f"out={out / 'search'}"]),
        ("search.py", [f"index={out / 'index'}", f"query={root / CLASSES[0]}", "k=3", f"out={out / 'mine'}"]),
        ("export.py", [f"ckpt_path={ckpt}", f"out={out / 'export'}"]),
    ]
    for script, args in steps:
        done = run_entry(script, args)
        assert done.returncode == 0, f"{script}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr
    said = json.loads((run / "checkpoints" / "last.metrics.json").read_text())["metrics"]
    assert said == pytest.approx(json.loads((run / "test_metrics.json").read_text()), abs=1e-6)
    assert len(json.loads((out / "mine" / "results.json").read_text())["results"]) == 6  # nested ones too


@pytest.mark.slow  # an entry point of its own
def test_a_bad_folder_stops_train_py_with_one_message_and_no_traceback(tmp_path):
    from tests.conftest import run_entry

    make_folder(tmp_path / "d", CLASSES[:1])
    done = run_entry(
        "train.py",
        ["dataset=folder", f"dataset.root={tmp_path / 'd'}", f"hydra.run.dir={tmp_path / 'run'}", *TINY],
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    assert "has 1 class; metric learning needs at least 2" in done.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_val_classes_are_drawn_from_a_given_split_s_training_classes(tmp_path):
    files = make_folder(tmp_path / "images")
    rows = [
        {"path": path, "label": name, "split": "test" if name in CLASSES[:2] else "train"}
        for name, paths in files.items()
        for path in paths
    ]
    table = make_table(tmp_path / "images" / "t.csv", rows)
    cfg = run_config(tmp_path, "dataset=table", f"dataset.table={table}", "dataset.val_classes=2")
    datamodule = prepared(cfg.dataset)
    classes = datamodule.split_description()["classes"]
    assert len(classes["val"]) == 2 and set(classes["val"]) <= set(CLASSES[2:])
    assert set(classes["test"]) == set(CLASSES[:2]) and len(classes["train"]) == 4
    assert class_names(datamodule, "val") == set(classes["val"])  # what split.json says is what is used
    assert datamodule.num_train_classes == datamodule.splits["train"].num_classes == 4


def test_the_resized_copy_takes_the_backbone_s_size_and_follows_the_folder(tmp_path):
    from dml.builders import build_data_and_module

    root = tmp_path / "data"
    files = make_folder(root)
    from_backbone = [
        "dataset.image_size=null",
        "dataset.resize_size=null",
        "dataset.mean=null",
        "dataset.std=null",
    ]
    overrides = ["dataset=folder", f"dataset.root={root}", "dataset.resized_cache=true", *from_backbone]
    datamodule, module = build_data_and_module(run_config(tmp_path, *overrides))
    config = module.backbone.data_config
    assert tuple(datamodule.mean) == tuple(config["mean"])  # counting the classes resolved nothing early
    datamodule.setup("fit")
    copy = root / f".dml_resized_{datamodule.resize_size}"
    assert (copy / "complete.json").is_file()
    name = datamodule.split_description()["classes"]["train"][0]
    renamed = root / name / "renamed.jpg"
    (root / files[name][0]).rename(renamed)
    again, _ = build_data_and_module(run_config(tmp_path, *overrides))
    again.setup("fit")
    assert (copy / name / "renamed.jpg").is_file()
    assert len(again.splits["train"]) == len(datamodule.splits["train"])
    images = again.splits["train"]
    assert all((images.source.root / p).is_file() for p in images.source.paths)


def test_a_broken_link_is_named_as_unreadable(tmp_path):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(Exception) as caught:  # Hydra wraps what the constructor raises
        folder_module(tmp_path / "d", tmp_path)
    error = find_user_error(caught.value)
    assert error is not None and "gone.jpg" in str(error) and "skip_bad_images" in str(error)


def test_a_class_dropped_by_the_run_may_leave_the_folder(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    make_folder(root, ["lonely"], per_class=1, start=900)
    train(run_config(tmp_path, "dataset=folder", f"dataset.root={root}", "trainer.max_epochs=1"))
    assert "lonely" in json.loads((tmp_path / "run" / "split.json").read_text())["classes"]["dropped"]
    shutil.rmtree(root / "lonely")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (
        Embedder.from_checkpoint(ckpt, device="cpu").embed_split("test", progress=False).vectors.shape[0] > 0
    )


def test_open_metric_learning_s_variants_read_as_they_mean(tmp_path, caplog):
    files = make_folder(tmp_path / "images")
    rows = oml_rows(files, CLASSES[:3])
    for row in rows:  # pandas writes booleans with missing values as floats
        row["is_query"] = {True: "1.0", False: "0.0"}.get(row["is_query"], "")
        row["is_gallery"] = {True: "1.0", False: "0.0"}.get(row["is_gallery"], "")
        row |= {"x_1": 0, "y_1": 0, "x_2": 5, "y_2": 5}
    table = make_table(tmp_path / "images" / "df.csv", rows)
    datamodule = prepared(run_config(tmp_path, "dataset=table", f"dataset.table={table}").dataset)
    assert "bounding boxes" in caplog.text
    assert int((datamodule.splits["test"].roles == 0).sum()) == 6
    split_csv = tmp_path / "split.csv"  # a spreadsheet's CSV starts with a byte-order mark
    split_csv.write_text(
        "class,split\n" + "".join(f"{c},{'test' if i < 2 else 'train'}\n" for i, c in enumerate(CLASSES)),
        encoding="utf-8-sig",
    )
    folder = folder_module(tmp_path / "images", tmp_path, f"dataset.split_file={split_csv}")
    assert set(folder.split_description()["classes"]["test"]) == set(CLASSES[:2])


def test_whole_float_labels_of_a_parquet_table_are_whole_numbers(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from dml.data.datasets.table import read_rows

    pq.write_table(
        pyarrow.Table.from_pylist([{"path": "a.jpg", "label": 3.0, "is_query": None}]), tmp_path / "t.parquet"
    )
    assert read_rows(tmp_path / "t.parquet") == [(2, {"path": "a.jpg", "label": "3", "is_query": None})]
