"""Faults a user meets: each gives one message naming the file or key and what to do, and loses nothing.

These run in-process (``dml.tasks.train`` is what ``train.py`` calls); the entry-point versions, with
signals, sweeps and exit codes, are in ``tests/test_faults_e2e.py`` (slow tier).
"""

from __future__ import annotations

import hashlib
import tarfile

import pytest
import torch
import torch.nn.functional as F

from dml.config import compose
from dml.data import CUBDataModule, SOPDataModule
from dml.data.preparation import INDEX_NAME, index_cache_path
from dml.errors import UserError
from dml.evaluation.pictures import embedding_map
from dml.tasks import train
from tests.benchmark_fixtures import make_cub, make_sop, tiny_cub, write_tgz, write_zip
from tests.conftest import FAST_RUN, read_only

SMALL = dict(
    image_size=8, resize_size=10, batch_size=4, samples_per_class=2, eval_batch_size=4, download=False
)


def digests(folder):
    """{file: md5} of a run folder, Hydra's own log aside."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


def fit(run, *overrides):
    return train(compose([*FAST_RUN, "~logger", *overrides], output_dir=run))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run: (its folder, {file: md5})."""
    run = tmp_path_factory.mktemp("finished")
    fit(run, "trainer.max_epochs=1")
    return run, digests(run)


# --- run folders and checkpoints (cases 3, 4, 5, 10) -------------------------------------------------


def test_a_finished_run_folder_is_not_trained_over(finished):
    run, before = finished
    with pytest.raises(UserError, match="already holds a run.*ckpt_path=last.*overwrite=true"):
        fit(run, "trainer.max_epochs=1")
    assert digests(run) == before, "config.yaml, checkpoints and test metrics are as they were"


def test_overwrite_true_replaces_the_earlier_run(tmp_path):
    fit(tmp_path, "trainer.max_epochs=1")
    (tmp_path / "checkpoints" / "epoch_000.ckpt").rename(tmp_path / "checkpoints" / "epoch_999.ckpt")
    fit(tmp_path, "trainer.max_epochs=1", "overwrite=true")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert not (tmp_path / ".replaced").exists(), "the replaced run goes once the new one has finished"


def test_a_replacement_that_fails_leaves_the_earlier_run_recoverable(finished, tmp_path, capsys):
    import shutil

    from dml.command import run_cli

    run, before = finished
    shutil.copytree(run, tmp_path / "run")
    cfg = compose(
        [*FAST_RUN, "~logger", "overwrite=true", "monitor.metric=val/recal@1"], output_dir=tmp_path / "run"
    )
    with pytest.raises(SystemExit) as stopped:
        run_cli(train, cfg)
    said = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in said and "monitor.metric" in said
    assert (
        f"The finished run this one was to replace is kept as it was in {tmp_path / 'run' / '.replaced'}"
        in said
    )
    assert digests(tmp_path / "run" / ".replaced") == before
    # The same command without overwrite=true must not train over it (and delete it when done).
    with pytest.raises(UserError, match=r"holds a finished run, set aside in .*\.replaced .* overwrite=true"):
        fit(tmp_path / "run", "trainer.max_epochs=1")
    assert digests(tmp_path / "run" / ".replaced") == before
    assert not (tmp_path / "run" / "test_metrics.json").exists()
    # Nor train from the set-aside run's checkpoint in place (its end would delete what it started from).
    inside = tmp_path / "run" / ".replaced" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"ckpt_path=.* is in .*\.replaced.* take it back first"):
        fit(tmp_path / "run", f"ckpt_path={inside}", "overwrite=true")
    assert digests(tmp_path / "run" / ".replaced") == before


def test_a_folder_whose_run_never_wrote_a_checkpoint_is_trained_into(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "config.yaml").write_text("stopped: before its first checkpoint\n")
    fit(tmp_path, "trainer.max_epochs=1")  # "run the same command again", as the stop message says
    assert (tmp_path / "test_metrics.json").is_file()


def test_resuming_with_another_lr_is_refused(finished):
    run, before = finished
    with pytest.raises(UserError, match=r"optimizer.lr: 0.001 in the checkpoint, 0.5 now"):
        fit(run, "trainer.max_epochs=1", "ckpt_path=last", "optimizer.lr=0.5")
    assert digests(run) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"not a checkpoint", "cannot be read as a PyTorch checkpoint"),
        ("truncated", "may be truncated"),
        ("other model", "written by a different model.*head.linear.weight: \\(64, 96\\) in the checkpoint"),
    ],
)
def test_unusable_checkpoint_is_one_message(finished, tmp_path, content, message):
    run, before = finished
    path = tmp_path / "resume.ckpt"
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    if content == "truncated":
        path.write_bytes(last[: len(last) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    extra = ["head.out_dim=32"] if content == "other model" else []
    with pytest.raises(UserError, match=message):
        fit(tmp_path / "new", f"ckpt_path={run / 'checkpoints' / 'last.ckpt' if extra else path}", *extra)
    assert digests(run) == before
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_ckpt_path_last_without_a_checkpoint_does_not_train_from_scratch(tmp_path):
    with pytest.raises(UserError, match="ckpt_path=last: .*last.ckpt does not exist"):
        fit(tmp_path, "ckpt_path=last")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "monitor.metric=val/recal@1",
            "monitor.metric=val/recal@1 is not a metric this run logs.*val/recall@1",
        ),
        ("model.knn_backend=fais", "model.knn_backend='fais' is not one of auto, torch, faiss"),
        ("+model.lr_mult.backbon=1", "model.lr_mult has unknown groups"),
    ],
)
def test_config_mistakes_are_caught_before_the_first_batch(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        fit(tmp_path, override)
    assert not (tmp_path / "checkpoints").exists(), "nothing trained"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.batch_size=abc", "dataset.batch_size='abc' must be a whole number$"),
        ("trainer.max_epochs=x", "trainer.max_epochs='x' must be a whole number or null"),
        ("+dataset.skip_bad_images=true", "dataset.skip_bad_images is not a setting of SyntheticDataModule"),
    ],
)
def test_values_that_cannot_work_are_named_before_anything_is_built(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        fit(tmp_path, override)
    assert not (tmp_path / "checkpoints").exists()


def test_an_rgb_model_on_a_grayscale_dataset_is_told_how_to_fit_them(tmp_path):
    from dml.builders import build_data_and_module

    # as evaluate.py meets it: the stored backbone took 3 channels, the dataset chosen now has 1
    cfg = compose(["backbone=timm_test", "dataset=mnist", "backbone.in_chans=3"], output_dir=tmp_path)
    with pytest.raises(
        UserError, match="dataset mnist gives 1-channel .* takes 3-channel ones: set dataset.channels=3"
    ):
        build_data_and_module(cfg)


def test_evaluate_without_a_checkpoint_says_how_to_give_one(tmp_path):
    from dml.tasks import evaluate

    with pytest.raises(UserError, match=r"ckpt_path= must be given: python evaluate.py ckpt_path=<run>"):
        evaluate(compose([], name="evaluate", output_dir=tmp_path))


def test_metric_names_are_what_evaluation_logs(finished):
    import json

    from dml.evaluation.protocol import EvaluationProtocol

    run, _ = finished
    logged = set(json.loads((run / "test_metrics.json").read_text()))
    names = EvaluationProtocol().metric_names("test", nmi=True, nmi_multiples=(), collapse=True)
    assert set(names) == logged


# --- datasets (cases 1, 8, 12) ------------------------------------------------------------------------


def cub_archive_with(tmp_path, change):
    """The CUB fixture archive with ``change(files)`` applied to its {name: bytes}."""
    make_cub(tmp_path / "good")
    with tarfile.open(tmp_path / "good" / "CUB_200_2011.tgz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    change(files)
    return files


def break_one_image(files):
    files[next(n for n in files if n.endswith(".jpg"))] = b"not a jpeg"


@pytest.mark.parametrize("change", [break_one_image, lambda f: f.pop("CUB_200_2011/image_class_labels.txt")])
def test_a_good_archive_put_in_place_after_a_failed_preparation_is_extracted(tmp_path, change):
    root = tmp_path / "cub"
    write_tgz(root / "CUB_200_2011.tgz", cub_archive_with(tmp_path, change))
    with pytest.raises(UserError, match="official archive"):
        CUBDataModule(str(root), num_train_classes=3, **SMALL).prepare_data()
    (tmp_path / "good" / "CUB_200_2011.tgz").replace(root / "CUB_200_2011.tgz")  # as the message says
    dm = CUBDataModule(str(root), num_train_classes=3, **SMALL)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 12 and (root / INDEX_NAME).is_file()


def test_a_prepared_folder_on_a_read_only_share_keeps_its_index_in_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "share" / "cub"
    make_cub(root)
    from dml.data.preparation import _extract

    _extract(root / "CUB_200_2011.tgz", root)
    monkeypatch.setenv("DML_CACHE", str(tmp_path / "cache"))
    with read_only(tmp_path / "share"):
        dm = CUBDataModule(str(root), num_train_classes=3, **SMALL)
        dm.prepare_data()
        dm.setup()
        again = CUBDataModule(str(root), num_train_classes=3, **SMALL)
        again.setup()
    assert len(dm.splits["test"]) == len(again.splits["test"]) == 12
    assert index_cache_path(root).is_file() and not (root / INDEX_NAME).exists()


def test_data_dir_that_is_a_file_is_one_message(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(UserError, match="cannot create the dataset folder .*data/cub"):
        CUBDataModule(str(tmp_path / "data" / "cub"), num_train_classes=3, **SMALL).prepare_data()


@pytest.mark.parametrize(
    "dataset, name, row",
    [("cub", "CUB_200_2011/image_class_labels.txt", b"7 seven\n"), ("sop", "Ebay_train.txt", b"5 2 1\n")],
)
def test_malformed_label_rows_name_the_file_and_line(tmp_path, dataset, name, row):
    root = tmp_path / dataset
    if dataset == "cub":
        files = cub_archive_with(tmp_path, lambda f: f.__setitem__(name, f[name] + row))
        write_tgz(root / "CUB_200_2011.tgz", files)
        module, line = CUBDataModule, len(files[name].splitlines())
    else:
        make_sop(tmp_path / "good")
        import zipfile

        with zipfile.ZipFile(tmp_path / "good" / "Stanford_Online_Products.zip") as z:
            files = {n: z.read(n) for n in z.namelist()}
        key = f"Stanford_Online_Products/{name}"
        files[key] += row
        write_zip(root / "Stanford_Online_Products.zip", files)
        module, line = SOPDataModule, len(files[key].splitlines())
    with pytest.raises(UserError, match=f"{name}, line {line}: '{row.decode().strip()}' is not a row of"):
        module(str(root), num_train_classes=3 if dataset == "cub" else 4, **SMALL).prepare_data()


def keep_one_test_image(files):
    """Leave a single image in the test classes (101-200), in every file that lists images."""
    test_ids = [
        r.split()[0]
        for r in files["CUB_200_2011/image_class_labels.txt"].decode().splitlines()
        if int(r.split()[1]) > 100
    ]
    drop = set(test_ids[1:])
    for name in ("CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt"):
        rows = [r for r in files[name].decode().splitlines() if r.split()[0] not in drop]
        files[name] = ("\n".join(rows) + "\n").encode()
    kept = {r.split()[1] for r in files["CUB_200_2011/images.txt"].decode().splitlines()}
    for name in [
        n for n in files if n.endswith(".jpg") and n.removeprefix("CUB_200_2011/images/") not in kept
    ]:
        del files[name]


def test_a_one_image_test_split_keeps_its_metrics_and_pictures(tmp_path):
    write_tgz(tmp_path / "data" / "cub" / "CUB_200_2011.tgz", cub_archive_with(tmp_path, keep_one_test_image))
    run = tmp_path / "run"
    metrics = fit(run, *tiny_cub(tmp_path / "data"), "trainer.max_epochs=1")
    assert "test/recall@1" in metrics and (run / "test_metrics.json").is_file()
    assert (run / "pictures" / "test_embedding_map.png").is_file()
    path = embedding_map(F.normalize(torch.randn(1, 16), dim=1), torch.tensor([3]), tmp_path / "m.png")
    assert path.is_file()


def test_unreadable_image_message_from_a_loader_worker_is_the_message_alone():
    from dml.command import user_message as _user_message

    wrapped = UserError(
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in load\ndml.errors.UserError: cannot read image /d/a.jpg: truncated'
    )
    assert _user_message(wrapped) == "cannot read image /d/a.jpg: truncated"
