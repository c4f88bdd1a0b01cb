"""Benchmark readers on small archives in the official layouts: splits, preparation and failures."""

import json
import urllib.request

import pytest
import torch

from dml.data import CarsDataModule, CUBDataModule, InShopDataModule, OmniglotDataModule, SOPDataModule
from dml.data import preparation as prep
from dml.data.preparation import INDEX_NAME, Archive
from dml.errors import UserError
from tests.benchmark_fixtures import BUILDERS, make_cub, write_tgz

MODULES = {
    "cub": CUBDataModule,
    "cars": CarsDataModule,
    "sop": SOPDataModule,
    "inshop": InShopDataModule,
    "omniglot": OmniglotDataModule,
}
SMALL = dict(
    image_size=8, resize_size=10, batch_size=4, samples_per_class=2, eval_batch_size=4, download=False
)


def prepared(name, root, **kwargs):
    expected = BUILDERS[name](root)
    dm = MODULES[name](
        root=str(root), **{"num_train_classes": expected["num_train_classes"]} | SMALL | kwargs
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm, expected


@pytest.mark.parametrize("name", sorted(MODULES))
def test_reader_finds_official_splits(tmp_path, name):
    dm, expected = prepared(name, tmp_path)
    for split in ("train", "test"):
        assert (len(dm.splits[split]), dm.splits[split].num_classes) == expected[split]
    train_classes = set(dm.load_raw()["train"].class_ids.tolist())
    assert not train_classes & set(dm.splits["test"].labels.tolist()), "train and test classes are disjoint"
    assert sorted(torch.unique(dm.splits["train"].labels).tolist()) == list(
        range(expected["num_train_classes"])
    )
    image, label, _ = dm.splits["test"][0]
    assert image.shape == (3, 8, 8) and torch.isfinite(image).all()
    images, labels, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 8, 8) and torch.bincount(labels).max() == 2
    assert (tmp_path / INDEX_NAME).is_file()
    assert f"{expected['train'][0]} images" in dm.summary()


def test_inshop_test_split_is_queries_and_gallery(tmp_path):
    dm, expected = prepared("inshop", tmp_path)
    roles = dm.splits["test"].roles
    assert int((roles == 0).sum()) == expected["queries"] and int((roles == 1).sum()) == expected["gallery"]
    assert "4 queries, 4 gallery" in dm.summary()


def test_omniglot_trains_on_alphabets_and_evaluates_characters_too(tmp_path):
    dm, expected = prepared("omniglot", tmp_path)
    test = dm.splits["test"]
    assert (
        test.num_classes == 2
        and len(torch.unique(test.extra_labels["character"])) == expected["test_characters"]
    )
    by_character = OmniglotDataModule(str(tmp_path), label_mode="character", num_train_classes=6, **SMALL)
    by_character.setup("fit")
    assert by_character.splits["train"].num_classes == 6
    assert len(torch.unique(by_character.splits["test"].extra_labels["alphabet"])) == 2


def test_val_classes_are_carved_from_training_classes(tmp_path):
    dm, _ = prepared("cub", tmp_path, val_classes=1, num_train_classes=2)
    assert dm.splits["val"].num_classes == 1 and dm.splits["train"].num_classes == 2
    assert dm.val_split_name == "val"


def test_second_preparation_reads_the_index_only(tmp_path, monkeypatch):
    prepared("sop", tmp_path)
    (tmp_path / "Stanford_Online_Products.zip").unlink()
    monkeypatch.setattr(prep, "ensure_files", lambda *a, **k: pytest.fail("prepared data was prepared again"))
    dm = SOPDataModule(str(tmp_path), num_train_classes=4, **SMALL)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 9


def test_missing_files_say_which_from_where_and_where_to(tmp_path):
    dm = CarsDataModule(str(tmp_path / "cars"), num_train_classes=98, **SMALL)
    with pytest.raises(UserError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert (
        "car_ims.tgz" in msg
        and "cars_annos.mat" in msg
        and "stanford.edu" in msg
        and str(tmp_path / "cars") in msg
    )
    assert not (tmp_path / "cars" / INDEX_NAME).exists()


def test_truncated_archive_is_named_and_leaves_nothing(tmp_path):
    make_cub(tmp_path)
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    dm = CUBDataModule(str(tmp_path), num_train_classes=3, **SMALL)
    with pytest.raises(UserError, match=f"{archive}.*truncated or corrupt"):
        dm.prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CUB_200_2011.tgz"]


def corrupt_one_image(tmp_path):
    make_cub(tmp_path)
    prep._extract(tmp_path / "CUB_200_2011.tgz", tmp_path)
    victim = next((tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim.write_bytes(b"not a jpeg")
    return victim


def test_unreadable_image_fails_preparation_by_path(tmp_path):
    victim = corrupt_one_image(tmp_path)
    dm = CUBDataModule(str(tmp_path), num_train_classes=3, **SMALL)
    with pytest.raises(UserError, match="skip_bad_images") as e:
        dm.prepare_data()
    assert str(victim) in str(e.value)
    assert not (tmp_path / INDEX_NAME).exists()


def test_skip_bad_images_drops_and_counts_them(tmp_path):
    victim = corrupt_one_image(tmp_path)
    dm = CUBDataModule(str(tmp_path), num_train_classes=3, skip_bad_images=True, **SMALL)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["test"]) == 23
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["skipped_images"] == 1
    assert not any(str(victim).endswith(p) for s in index["splits"].values() for p in s["path"])


def test_download_checks_the_checksum_and_keeps_no_partial_file(tmp_path):
    source = tmp_path / "server"
    source.mkdir()
    write_tgz(source / "pack.tgz", {"pack/a.txt": b"hello"})
    import hashlib

    good = hashlib.md5((source / "pack.tgz").read_bytes()).hexdigest()
    url = (source / "pack.tgz").as_uri()
    root = tmp_path / "data"
    prep.ensure_files(root, "demo", [Archive("pack.tgz", "pack", url=url, md5=good)])
    assert (root / "pack" / "a.txt").read_text() == "hello"
    with pytest.raises(UserError, match="does not match its published checksum"):
        prep.ensure_files(tmp_path / "other", "demo", [Archive("pack.tgz", "pack", url=url, md5="0" * 32)])
    assert not list((tmp_path / "other").iterdir())
    assert urllib.request  # file:// URLs go through the same urllib path as http(s) and ftp


def make_command(target, **variables):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ROOT

    venv = Path(sys.prefix)
    if not (venv / ".installed").exists() or shutil.which("make") is None:
        pytest.skip(f"make targets need the project venv made by `make install` ({venv} is not it)")
    args = [f"{k}={v}" for k, v in variables.items()]
    # a make typed by a user: not nested in the make that runs the tests (make test-all), whose level and
    # variables would reach it through the environment
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow  # make, then two entry points
@pytest.mark.parametrize("name", sorted(MODULES))
def test_make_train_and_evaluate_on_each_fixture_benchmark(tmp_path, name):
    expected = BUILDERS[name](tmp_path / "data" / name)
    run = tmp_path / "run"
    args = " ".join(
        [
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={run}",
            "backbone=timm_test",
            f"dataset.num_train_classes={expected['num_train_classes']}",
            "dataset.image_size=32",
            "dataset.resize_size=36",
            "dataset.num_workers=0",
            "dataset.persistent_workers=false",
            "dataset.pin_memory=false",
            "dataset.batch_size=4",
            "dataset.samples_per_class=2",
            "dataset.download=false",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "callbacks=no_progress",
            "trainer.enable_progress_bar=false",
        ]
    )
    trained = make_command("train", DATA=name, ARGS=args)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "test/recall@1" in trained.stdout + trained.stderr
    if name == "omniglot":
        assert "test/character/recall@1" in trained.stdout + trained.stderr
    ckpt = next((run / "checkpoints").glob("epoch_*.ckpt"))
    evaluated = make_command("evaluate", CKPT=str(ckpt), ARGS=f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert json.loads(ckpt.with_name(f"{ckpt.stem}.metrics.json").read_text())["metrics"] == pytest.approx(
        json.loads((run / "test_metrics.json").read_text()), abs=1e-6
    )


def test_normalisation_and_sizes_come_from_the_backbone_when_left_null(tmp_path):
    make_cub(tmp_path)
    dm = CUBDataModule(str(tmp_path), num_train_classes=3, **SMALL | dict(image_size=None, resize_size=None))
    dm.use_backbone_config(
        {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2), "input_size": (3, 16, 16), "crop_pct": 0.8}
    )
    assert (dm.image_size, dm.resize_size, dm.mean) == (16, 20, (0.5, 0.5, 0.5))
    dm.setup()
    image, _, _ = dm.splits["test"][0]
    assert image.shape == (3, 16, 16)
    bgr = CUBDataModule(
        str(tmp_path),
        num_train_classes=3,
        bgr_255=True,
        mean=(104.0, 117.0, 128.0),
        std=(1.0, 1.0, 1.0),
        **SMALL,
    )
    bgr.setup()
    assert bgr.splits["test"][0][0].abs().max() > 20  # 0-255 scale
