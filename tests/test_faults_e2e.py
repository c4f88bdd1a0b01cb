"""Faults met through the entry points, as a user meets them: signals, sweeps, a full disk, evaluation."""

from __future__ import annotations

import hashlib
import json
import resource
import shlex
import signal

import pytest

from tests.benchmark_fixtures import make_cub, tiny_cub
from tests.conftest import FAST_RUN, read_only, run_entry

pytestmark = pytest.mark.slow  # each test runs the entry points several times


def out_of(proc):
    return proc.stdout + proc.stderr


def one_message(proc, code, *needles):
    text = out_of(proc)
    assert proc.returncode == code, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


STOP = ["+callbacks.stop._target_=tests.crash.SignalAtStep", "+callbacks.stop.step=10"]


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_run_non_zero_and_says_how_to_resume(tmp_path, name, code):
    run = tmp_path / "run"
    common = [*FAST_RUN, "trainer.max_epochs=3"]
    stopped = run_entry(
        "train.py", [*common, *STOP, f"+callbacks.stop.signal={name}", f"hydra.run.dir={run}"]
    )
    one_message(stopped, code, f"stopped by {name}", "after 1 epoch(s)", "Resume it with:")
    assert not (run / "test_metrics.json").exists()
    command = shlex.split(out_of(stopped).split("Resume it with:")[1].strip().splitlines()[0])
    assert command[:2] == ["python", "train.py"] and command[-1] == "ckpt_path=last"
    args = [a for a in command[2:] if not a.startswith("+callbacks.stop")]
    resumed = run_entry("train.py", args)
    assert resumed.returncode == 0, out_of(resumed)
    assert "Restored all states" in out_of(resumed) and (run / "test_metrics.json").is_file()


def test_a_finished_run_folder_is_left_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    assert run_entry("train.py", [*FAST_RUN, "trainer.max_epochs=1", f"hydra.run.dir={run}"]).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = run_entry("train.py", [*FAST_RUN, "trainer.max_epochs=1", f"hydra.run.dir={run}"])
    one_message(again, 2, "already holds a run", "overwrite=true")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "Hydra's files and log too"


def test_a_sweep_goes_on_past_a_failed_job_and_lists_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py",
        ["-m", *FAST_RUN, "trainer.max_epochs=1", "loss.antico_weight=nan,0.5", f"hydra.sweep.dir={sweep}"],
    )
    one_message(proc, 1, "1 job(s) of the sweep failed", "the loss is not finite")
    assert "the loss is not finite" in (sweep / "0" / "FAILED").read_text()
    assert (sweep / "1" / "test_metrics.json").is_file(), "the job after the failed one ran"


def optuna_search(sweep, params: str, *extra: str):
    """train.py's two-trial Optuna search of ``params`` on synthetic data into ``sweep``."""
    return run_entry(
        "train.py",
        [
            *FAST_RUN,
            "hparams_search=antico_optuna",
            "dataset=synthetic",
            "dataset.val_classes=2",
            "dataset.num_train_classes=4",
            "dataset.batch_size=16",
            "trainer.max_epochs=1",
            "hydra.sweeper.n_trials=2",
            *extra,
            f"hydra.sweeper.params={params}",
            f"hydra.sweep.dir={sweep}",
        ],
    )


def test_a_diverged_optuna_trial_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = optuna_search(
        sweep,
        "{loss.antico_weight:'choice(1e40, 0.5)',loss.terms.antico.loss.eps:'choice(0.5)'}",
        "seed=0",  # the sampler's seed too: its two start-up draws are 0.5, then 1e40
    )
    one_message(proc, 1, "1 job(s) of the sweep failed")
    results = (sweep / "optimization_results.yaml").read_text()
    assert "loss.antico_weight: 0.5" in results, results


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    common = [*FAST_RUN, "trainer.max_epochs=2", f"hydra.run.dir={run}"]
    crash = ["+callbacks.crash._target_=tests.crash.CrashAtStep", "+callbacks.crash.step=10"]
    assert run_entry("train.py", [*common, *crash]).returncode == 9
    last = run / "checkpoints" / "last.ckpt"
    digest, size = hashlib.md5(last.read_bytes()).hexdigest(), last.stat().st_size

    def small_files():  # no file of this process may grow past half a checkpoint: a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    full = run_entry("train.py", [*common, "ckpt_path=last"], preexec_fn=small_files)
    one_message(full, 2, f"could not write checkpoint {run / 'checkpoints'}", "previous last.ckpt is kept")
    assert hashlib.md5(last.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch_000.ckpt", "last.ckpt"], "no partial file"


def test_an_unwritable_run_folder_is_one_message(tmp_path):
    (tmp_path / "logs").mkdir()
    with read_only(tmp_path / "logs"):
        proc = run_entry("train.py", [*FAST_RUN, f"hydra.run.dir={tmp_path / 'logs' / 'run'}"])
    one_message(proc, 2, f"cannot write the run folder {tmp_path / 'logs' / 'run'}", "hydra.run.dir=")
    (tmp_path / "afile").write_text("")
    proc = run_entry("train.py", [*FAST_RUN, f"hydra.run.dir={tmp_path / 'afile'}"])
    one_message(proc, 2, f"cannot write the run folder {tmp_path / 'afile'}")


def test_data_dir_that_is_a_file_is_one_message(tmp_path):
    (tmp_path / "data").write_text("")
    proc = run_entry(
        "train.py", ["dataset=cub", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'r'}"]
    )
    one_message(proc, 2, f"cannot create the dataset folder {tmp_path / 'data' / 'cub'}")


@pytest.fixture(scope="module")
def cub_run(tmp_path_factory):
    """A one-epoch run on the CUB fixture, with its data then moved elsewhere."""
    base = tmp_path_factory.mktemp("cub")
    make_cub(base / "data" / "cub")
    run = base / "run"
    proc = run_entry(
        "train.py",
        [
            *tiny_cub(base / "data"),
            "backbone=timm_test",
            "trainer.max_epochs=2",
            *FAST_RUN[1:],
            f"hydra.run.dir={run}",
        ],
    )
    assert proc.returncode == 0, out_of(proc)
    (base / "data").rename(base / "moved")
    return base, run


def test_evaluate_keeps_one_metrics_file_per_checkpoint_and_follows_paths_data_dir(cub_run, tmp_path):
    base, run = cub_run
    best = next((run / "checkpoints").glob("epoch_*.ckpt"))
    last = run / "checkpoints" / "last.ckpt"
    proc = run_entry(
        "evaluate.py",
        [f"ckpt_path=[{best},{last}]", f"paths.data_dir={base / 'moved'}", f"hydra.run.dir={tmp_path}"],
    )
    assert proc.returncode == 0, out_of(proc)
    for ckpt in (best, last):
        record = json.loads(ckpt.with_name(f"{ckpt.stem}.metrics.json").read_text())
        assert record["checkpoint"] == str(ckpt) and "test/recall@1" in record["metrics"]


def test_evaluate_on_another_dataset_takes_that_dataset_whole(cub_run, tmp_path):
    base, run = cub_run
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = run_entry(
        "evaluate.py",
        [f"ckpt_path={ckpt}", "dataset=mnist", "dataset.channels=3", f"hydra.run.dir={tmp_path}"],
    )
    assert proc.returncode == 0, out_of(proc)
    assert "test (mnist, unseen classes)" in out_of(proc)
    assert ckpt.with_name("last.mnist.metrics.json").is_file(), "the CUB metrics of last.ckpt stay"
    # A dataset chosen by name lives under this command's paths.data_dir, not the training run's.
    args = ["dataset=cub", "dataset.num_train_classes=3", f"paths.data_dir={base / 'moved'}"]
    proc = run_entry("evaluate.py", [f"ckpt_path={ckpt}", *args, f"hydra.run.dir={tmp_path / 'cub'}"])
    assert proc.returncode == 0, out_of(proc)
    assert ckpt.with_name("last.cub.metrics.json").is_file()


def test_evaluate_takes_keys_of_the_stored_dataset_and_names_a_channel_mismatch(cub_run, tmp_path):
    base, run = cub_run
    ckpt = run / "checkpoints" / "last.ckpt"
    moved = f"paths.data_dir={base / 'moved'}"
    # dataset.skip_bad_images is a key of CUB's config, not of the default (MNIST) one evaluate.py composes
    proc = run_entry(
        "evaluate.py",
        [f"ckpt_path={ckpt}", moved, "dataset.skip_bad_images=true", f"hydra.run.dir={tmp_path / 'a'}"],
    )
    assert proc.returncode == 0, out_of(proc)
    proc = run_entry("evaluate.py", [f"ckpt_path={ckpt}", "dataset=mnist", f"hydra.run.dir={tmp_path / 'b'}"])
    one_message(
        proc,
        2,
        "dataset mnist gives 1-channel images and the backbone takes 3-channel ones: set dataset.channels=3",
    )
    proc = run_entry(
        "evaluate.py",
        [f"ckpt_path={ckpt}", moved, "dataset.batch_size=abc", f"hydra.run.dir={tmp_path / 'c'}"],
    )
    one_message(proc, 2, "dataset.batch_size='abc' must be a whole number")


@pytest.mark.parametrize("pipeline", ["classic", "fast"])
def test_an_image_unreadable_in_a_loader_worker_is_one_message(cub_run, tmp_path, pipeline):
    base, run = cub_run
    images = base / "moved" / "cub" / "CUB_200_2011" / "images"
    victim = sorted(p for p in images.rglob("*.jpg") if p.parent.name.startswith("10"))[0]  # a test class
    victim.write_bytes(b"")
    proc = run_entry(
        "evaluate.py",
        [
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "dataset.num_workers=1",
            f"dataset.pipeline={pipeline}",  # fast: the bytes are read in the worker, decoded in the main process
            f"paths.data_dir={base / 'moved'}",
            f"hydra.run.dir={tmp_path}",
        ],
    )
    one_message(proc, 2, f"cannot read image {victim}")


@pytest.mark.parametrize(
    "script, message",
    [
        ("embed.py", "ckpt_path= must be given: python embed.py ckpt_path=<ckpt> images="),
        ("index.py", "embeddings= must be given: python index.py embeddings=<file>"),
        ("search.py", "index=, query= must be given: python search.py index=<dir> query="),
        ("export.py", "ckpt_path= must be given: python export.py ckpt_path=<ckpt>"),
        ("evaluate.py", "ckpt_path= must be given: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt"),
    ],
)
def test_an_entry_point_without_its_required_argument_is_one_message(tmp_path, script, message):
    proc = run_entry(script, [], cwd=tmp_path)
    one_message(proc, 2, message)
    assert "Warning" not in out_of(proc)
    assert not (tmp_path / "logs").exists(), "no run folder for a refused command"


def test_a_run_without_hydra_run_dir_prints_no_internal_warning_and_claims_its_folder(tmp_path):
    proc = run_entry("train.py", [*FAST_RUN, "trainer.max_epochs=1"], cwd=tmp_path)
    assert proc.returncode == 0, out_of(proc)
    assert "InterpolationResolutionError" not in out_of(proc) and "Callback RunFolders" not in out_of(proc)
    assert len(list((tmp_path / "logs" / "train" / "runs").iterdir())) == 1


def test_a_path_hydra_cannot_read_is_told_how_to_quote(tmp_path):
    photo = tmp_path / "фото [final].jpg"
    proc = run_entry("search.py", [f"index={tmp_path / 'index'}", f"query={photo}"], cwd=tmp_path)
    one_message(proc, 2, "quote it for Hydra", f'query="{photo}"')
    quoted = shlex.split(out_of(proc).rsplit("which in a shell is ", 1)[1].strip())
    proc = run_entry("search.py", [f"index={tmp_path / 'index'}", *quoted], cwd=tmp_path)
    one_message(proc, 2, f"index='{tmp_path / 'index'}' is not an index folder")


def test_embed_into_a_read_only_folder_is_refused_before_the_model_runs(cub_run, tmp_path):
    _, run = cub_run
    (tmp_path / "shared").mkdir()
    with read_only(tmp_path / "shared"):
        proc = run_entry(
            "embed.py",
            [
                f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"out={tmp_path / 'shared' / 'e.safetensors'}",
            ],
            cwd=tmp_path,
        )
    one_message(
        proc, 2, f"out='{tmp_path / 'shared' / 'e.safetensors'}' cannot be written", "Read-only file system"
    )
    assert list((tmp_path / "shared").iterdir()) == []


def test_an_optuna_search_whose_every_trial_fails_ends_in_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = optuna_search(sweep, "{loss.antico_weight:'choice(nan)'}")
    one_message(
        proc, 1, "all 2 jobs of the sweep failed", f"{sweep / '0'}: the loss is not finite", f"{sweep / '1'}:"
    )
