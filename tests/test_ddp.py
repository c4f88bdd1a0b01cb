"""DDP on CPU (gloo, 2 processes). Each run goes in its own interpreter: Lightning's DDP re-launches the
command line, and two process groups in one process would collide on their port."""

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import FAST_RUN, ROOT, run_entry

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP tests run on Linux and macOS"),
    pytest.mark.slow,  # multi-process: make test-all (what CI runs)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(module: str) -> str:
    """Run a tests/ddp_*_worker module (it spawns its own gloo ranks); its output, once it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", module, str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_ranks_draw_disjoint_classes_and_every_loss_equals_one_process():
    from dml.config import loss_names

    out = run_worker("tests.ddp_loss_worker")
    checked = {line.split()[0] for line in out.splitlines() if line.endswith(" ok")}
    assert checked == {"sampler", *loss_names()}, out  # every file of conf/loss


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
        results[name] = json.loads(ckpt.with_name(f"{ckpt.stem}.metrics.json").read_text())["metrics"]
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


def test_each_rank_resumes_with_its_own_random_state():
    out = run_worker("tests.ddp_resume_worker")
    assert out.count(" ok") == 2, out


@pytest.mark.parametrize("loss", ["antico", "ms_antico"])
def test_pair_antico_trains_under_ddp(tmp_path, loss):
    """The composite made a proxy bank that no pair term used, and DDP refused the unused parameter."""
    run = tmp_path / loss
    proc = run_entry(
        "train.py",
        [
            *FAST_RUN,
            f"loss={loss}",
            "trainer=ddp_sim",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3",
            "test=false",
            f"hydra.run.dir={run}",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    assert not any(k.startswith("loss.") for k in state["state_dict"]), "a pair loss owns no parameter"


def test_gradient_accumulation_under_ddp_equals_one_process(tmp_path):
    """2 processes x 2 accumulated micro-batches take the step of one process on the same global
    micro-batches. One SGD step (lr 0.5, no momentum or decay) makes the weights show the gradients;
    BatchNorm frozen, since per-process batch statistics would differ by design."""
    common = [
        *FAST_RUN,
        "backbone.freeze_bn=true",
        "~scheduler",
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=0.5",
        "optimizer.weight_decay=0",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.accumulate_grad_batches=2",
        "test=false",
    ]
    import torch

    weights = {}
    for name, extra in (("one", ["trainer.accelerator=cpu"]), ("ddp", ["trainer=ddp_sim"])):
        proc = run_entry("train.py", [*common, *extra, f"hydra.run.dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == 1, "two micro-batches make one optimizer step"
        weights[name] = ckpt["state_dict"]
    moved = [k for k, v in weights["one"].items() if v.is_floating_point()]
    assert moved
    for key in moved:
        assert torch.allclose(weights["ddp"][key], weights["one"][key], atol=2e-5, rtol=1e-4), key
