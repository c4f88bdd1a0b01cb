"""Train and evaluate through the real entry points, in fresh interpreters, as a user would.

The everyday tier runs one short training and evaluates it; the other entry-point runs are ``slow``.
"""

import json
import re

import pytest

from tests.conftest import FAST_RUN, ROOT, run_entry


def out_of(proc):
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_entry("train.py", [*FAST_RUN, f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir}"])
    assert proc.returncode == 0, out_of(proc)
    return run_dir, proc


def test_train_saves_checkpoints_config_and_logs_every_term(trained):
    run_dir, proc = trained
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and len(list(ckpts.glob("epoch_*.ckpt"))) == 1
    import torch

    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 1, "last.ckpt is the final epoch's"
    assert {p.name for p in (run_dir / "pictures").iterdir()} == {
        "test_embedding_map.png",
        "test_spectrum.png",
        "test_retrievals.png",
    }
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    metrics_csv = next(run_dir.glob("csv/version_*/metrics.csv")).read_text().splitlines()[0]
    for key in ("train/loss", "train/loss/proxy_anchor", "train/loss/antico", "val/recall@1", "val/map@r"):
        assert key in metrics_csv.split(",")
    text = out_of(proc)
    for key in ("test/recall@1", "test/recall@2", "test/recall@4", "test/recall@8", "test/map@r", "test/nmi"):
        assert key in text
    assert "best checkpoint:" in text and str(run_dir) in text
    assert "Traceback" not in text


def printed_metrics(text):
    return dict(re.findall(r"│ (test/\S+)\s+│\s+([0-9.]+) │", text))


def test_evaluate_reproduces_the_test_metrics_training_printed(trained, tmp_path):
    run_dir, proc = trained
    trained_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    ckpt = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    ev = run_entry(
        "evaluate.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}", "trainer.accelerator=cpu"]
    )
    assert ev.returncode == 0, out_of(ev)
    written = json.loads(ckpt.with_name(f"{ckpt.stem}.metrics.json").read_text())
    assert written["metrics"] == pytest.approx(trained_metrics, abs=1e-6)
    assert printed_metrics(out_of(ev)) == printed_metrics(out_of(proc))
    assert len(printed_metrics(out_of(ev))) == 11  # 4 recalls, MAP@R, R-Precision, NMI, 4 collapse measures


def assert_user_error(proc, *needles):
    text = out_of(proc)
    assert proc.returncode != 0
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


@pytest.mark.slow  # an entry point of its own
def test_checkpoint_of_another_model_is_refused_with_advice(trained, tmp_path):
    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_entry("evaluate.py", [f"ckpt_path={ckpt}", "head.out_dim=32", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "written by a different model", "head.linear.weight")
    assert not ckpt.with_name("last.metrics.json").exists(), "a refused checkpoint gets no metrics file"


@pytest.mark.slow  # an entry point of its own
def test_not_a_dml_checkpoint(tmp_path):
    import torch

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    proc = run_entry("evaluate.py", [f"ckpt_path={path}", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "not a checkpoint written by dml")


@pytest.mark.slow  # an entry point of its own
def test_missing_dataset_is_one_message(tmp_path):
    proc = run_entry("train.py", [f"dataset.root={tmp_path}/mnist", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "error:", "is not a folder", "dataset.root=null")


@pytest.mark.slow  # an entry point of its own
def test_unknown_config_option_is_one_message(tmp_path):
    proc = run_entry("train.py", ["trainer.max_epoch=3", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "Could not override 'trainer.max_epoch'")
    proc = run_entry("train.py", ["loss=nonexistent", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "Could not find 'loss/nonexistent'", "proxy_anchor_antico")


@pytest.mark.slow  # an entry point of its own
def test_empty_split_is_one_message(tmp_path):
    proc = run_entry("train.py", ["dataset.test_digits=[]", f"hydra.run.dir={tmp_path}"])
    assert_user_error(proc, "test split of dataset mnist is empty")


@pytest.mark.slow  # an entry point of its own
def test_wandb_runs_offline_and_says_how_to_sync(tmp_path):
    proc = run_entry("train.py", [*FAST_RUN, "logger=wandb", "debug=fast", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, out_of(proc)
    assert "wandb sync" in out_of(proc)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    images = {p.name.split("_")[0] for p in run.glob("files/media/images/test/*.png")}
    assert images == {"embedding", "spectrum", "retrievals"}, "the pictures are logged to wandb"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "make train" in readme and "make test" in readme


@pytest.mark.slow  # an entry point of its own
def test_non_finite_loss_stops_with_the_step_and_terms_and_keeps_checkpoints(tmp_path):
    import hashlib

    run = tmp_path / "run"
    constant = [*FAST_RUN, "~scheduler"]  # a cosine T_max follows max_epochs, which a resume may not change
    first = run_entry("train.py", [*constant, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run}"])
    assert first.returncode == 0, out_of(first)
    last = run / "checkpoints" / "last.ckpt"
    digest = hashlib.md5(last.read_bytes()).hexdigest()
    broken = run_entry(
        "train.py",
        [
            *constant,
            "trainer.max_epochs=3",
            f"ckpt_path={last}",
            "loss.antico_weight=nan",
            f"hydra.run.dir={run}",
        ],
    )
    assert_user_error(broken, "the loss is not finite at epoch 1, step 7", "antico = ", "proxy_anchor = ")
    assert hashlib.md5(last.read_bytes()).hexdigest() == digest, "the last good checkpoint is kept as it was"
    assert sorted(p.name for p in last.parent.glob("epoch_*.ckpt")) == ["epoch_000.ckpt"]


@pytest.mark.slow  # an entry point of its own
def test_run_killed_mid_epoch_resumes_from_last_to_the_same_metrics(tmp_path):
    # Random miners and the global RNG are in play (triplet_random); the kill comes mid-epoch 2.
    common = [*FAST_RUN, "loss=triplet_random", "trainer.max_epochs=3"]
    full = run_entry("train.py", [*common, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, out_of(full)
    part = tmp_path / "part"
    crash = ["+callbacks.crash._target_=tests.crash.CrashAtStep", "+callbacks.crash.step=10"]
    killed = run_entry("train.py", [*common, *crash, f"hydra.run.dir={part}"])
    assert killed.returncode == 9, out_of(killed)
    assert not (part / "test_metrics.json").exists()
    resumed = run_entry("train.py", [*common, "ckpt_path=last", f"hydra.run.dir={part}"])
    assert resumed.returncode == 0, out_of(resumed)
    assert "Restored all states" in out_of(resumed)
    expected = json.loads((tmp_path / "full" / "test_metrics.json").read_text())
    assert json.loads((part / "test_metrics.json").read_text()) == pytest.approx(expected, abs=1e-6)


def test_each_sweep_is_one_wandb_group(monkeypatch, tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from dml import loggers

    fake = OmegaConf.create(
        {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path / "2026-11-22_10-00-00")}, "job": {"num": 3}}
    )
    monkeypatch.setattr(loggers.HydraConfig, "get", staticmethod(lambda: fake))
    logger = loggers.wandb_logger(project="dml", save_dir=str(tmp_path), group="antico", offline=True)
    assert logger._wandb_init["group"] == "antico/2026-11-22_10-00-00"
    assert logger._wandb_init["name"] == "job3"
