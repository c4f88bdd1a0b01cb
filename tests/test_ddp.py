"""DDP on CPU (gloo, 2 processes). Each run goes in its own interpreter: Lightning's DDP re-launches the
command line, and two process groups in one process would collide on their port."""

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import FAST_RUN, ROOT, run_entry

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP tests run on Linux and macOS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_draw_disjoint_classes_and_every_loss_family_equals_one_process():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ddp_loss_worker", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 15, proc.stdout  # the sampler and 14 loss terms


def test_ddp_training_and_evaluation_match_one_process(tmp_path):
    # 5 test classes x 3 modes x 11 images = 165: odd, so the distributed sampler pads with repeats.
    data = ["dataset.test_classes=5", "dataset.images_per_mode=11"]
    run = tmp_path / "ddp"
    trained = run_entry("train.py", [*FAST_RUN, *data, "trainer=ddp_sim", f"hydra.run.dir={run}"])
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "test/recall@1" in trained.stdout + trained.stderr
    ckpt = run / "checkpoints" / "last.ckpt"
    results = {}
    for name, extra in (("one", ["trainer.accelerator=cpu"]), ("two", ["trainer=ddp_sim"])):
        ev = run_entry("evaluate.py", [f"ckpt_path={ckpt}", *extra, f"hydra.run.dir={tmp_path / name}"])
        assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
        results[name] = json.loads((ckpt.parent / "metrics.json").read_text())["metrics"]
    assert results["two"] == pytest.approx(results["one"], abs=1e-6)


def test_multirun_sweep_under_ddp_runs_every_combination(tmp_path):
    """`-m` with trainer=ddp_sim: Lightning re-launches rank 1 with the job's own overrides."""
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py",
        [
            "-m",
            *FAST_RUN,
            "trainer=ddp_sim",
            "trainer.max_epochs=1",
            "loss.antico_weight=0.0,0.5",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    import yaml

    seen = set()
    for job in jobs:
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["trainer"]["devices"] == 2
        seen.add((cfg["loss"]["antico_weight"], cfg["seed"]))
        assert "test/recall@1" in json.loads((job / "test_metrics.json").read_text())
    assert seen == {(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)}
    assert not (tmp_path / "logs").exists(), "no re-launched rank wrote a run of its own"
