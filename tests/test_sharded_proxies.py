"""Class proxies sharded across ranks (dml.losses.sharded): exact against one process holding the whole
bank, on 2 and 3 gloo processes (each run in its own interpreter)."""

import json
import subprocess
import sys

import pytest
import torch

from dml.losses.proxy import ProxyBank
from dml.losses.sharded import shard_bounds
from tests.conftest import ROOT
from tests.sharded_proxies_worker import terms
from tests.test_ddp import free_port


@pytest.mark.slow  # multi-process
@pytest.mark.skipif(sys.platform == "win32", reason="gloo runs on Linux and macOS")
@pytest.mark.parametrize("world", [2, 3])
def test_every_proxy_term_sharded_equals_one_process_with_the_whole_bank(world):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_proxies_worker", str(world), str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:-1] == [f"{name} ok" for name in terms()], proc.stdout


def test_shards_cover_the_classes_once_and_differ_by_one_at_most():
    for classes, world in ((10, 3), (7, 7), (100, 8), (5, 2)):
        bounds = [shard_bounds(classes, world, rank) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = {hi - lo for lo, hi in bounds}
        assert max(sizes) - min(sizes) <= 1


def test_a_bank_keeps_its_slice_and_its_class_count():
    torch.manual_seed(0)
    bank = ProxyBank(10, 4)
    whole = bank.weight.detach().clone()
    bank.shard(3, 1)
    assert bank.sharded and bank.num_classes == 10 and bank.offset == 4
    assert torch.equal(bank.weight.detach(), whole[4:7])
    with pytest.raises(ValueError, match="cannot be sharded over 11 ranks"):
        ProxyBank(10, 4).shard(11, 0)


def _train(run, *overrides):
    from tests.conftest import FAST_RUN, run_entry

    args = [*FAST_RUN, "scheduler=step", *overrides, f"hydra.run.dir={run}"]
    done = run_entry("train.py", args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((run / "test_metrics.json").read_text())


@pytest.mark.slow  # five entry points, three of them on several processes
@pytest.mark.skipif(sys.platform == "win32", reason="gloo runs on Linux and macOS")
def test_a_sharded_run_resumes_on_3_ranks_and_on_1_and_evaluates_in_one_process(tmp_path):
    from tests.conftest import run_entry

    sharded = ["loss.shard_proxies=true", "trainer=ddp_sim"]
    two = _train(tmp_path / "two", *sharded, "trainer.max_epochs=1")
    replicated = _train(tmp_path / "replicated", "trainer=ddp_sim", "trainer.max_epochs=1")
    assert two == pytest.approx(replicated, abs=1e-4)  # the same training, float32 sums in another order
    ckpt = tmp_path / "two" / "checkpoints" / "last.ckpt"
    payload = torch.load(ckpt, weights_only=False)
    assert payload["state_dict"]["loss._proxies.weight"].shape[0] == 6  # the whole bank
    state = payload["optimizer_states"][0]
    (bank,) = [g["params"][0] for g in state["param_groups"] if g["name"] == "loss/proxies"]
    assert state["state"][bank]["exp_avg"].shape[0] == 6
    for name, more in (("three", ["trainer.devices=3", *sharded]), ("one", ["loss.shard_proxies=true"])):
        _train(tmp_path / name, *more, "trainer.max_epochs=2", f"ckpt_path={ckpt}")
    evaluated = run_entry("evaluate.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'evaluation'}"])
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    said = json.loads(ckpt.with_name("last.metrics.json").read_text())["metrics"]
    assert said == pytest.approx(two, abs=1e-6)


def test_sharding_is_refused_where_it_cannot_work(compose_cfg):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from dml.errors import UserError
    from dml.models.sharding import shard_proxies

    def module(loss: str, **trainer):
        cfg = compose_cfg([f"loss={loss}", "dataset=cub", "dataset.num_train_classes=4"])
        clip = {"gradient_clip_val": None, "gradient_clip_algorithm": "norm"} | trainer
        return SimpleNamespace(loss=instantiate(cfg.loss), trainer=SimpleNamespace(**clip))

    with pytest.raises(UserError, match="has no class proxies to shard"):
        shard_proxies(module("contrastive"), 2, 0)
    with pytest.raises(UserError, match="over 5 processes needs at least 5 classes"):
        shard_proxies(module("proxy_anchor"), 5, 0)
    with pytest.raises(UserError, match="clip by value"):
        shard_proxies(module("proxy_anchor", gradient_clip_val=10.0), 2, 0)
    one = module("proxy_anchor")
    shard_proxies(one, 1, 0)  # one process: nothing to shard
    assert not one.loss.bank.sharded
