"""Class proxies sharded across ranks (dml.losses.sharded): exact against one process holding the whole
bank, on 2 and 3 gloo processes (each run in its own interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dml.losses.proxy import ProxyBank
from dml.losses.sharded import shard_bounds
from tests.conftest import ROOT
from tests.sharded_proxies_worker import SAMPLED, terms
from tests.test_ddp import free_port


@pytest.mark.slow  # multi-process
@pytest.mark.skipif(sys.platform == "win32", reason="gloo runs on Linux and macOS")
@pytest.mark.parametrize("world", [2, 3])
def test_every_proxy_term_sharded_equals_one_process_with_the_whole_bank(world):
    """Also with the ranks holding different numbers of items (gather_batch pads them), and with negative
    proxies sampled: equal to one process holding the proxies every rank drew."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_proxies_worker", str(world), str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    expected = [f"{name}{layout} ok" for layout in ("", " uneven") for name in terms()]
    expected += [f"{name} sampled ok" for name in SAMPLED] + ["gathered in pieces ok"]
    assert proc.stdout.split("\n")[:-1] == expected, proc.stdout


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

    # float64: the same training through another order of sums stays equal to 1e-9 (in float32 the
    # rounding differences grow step after step, Proxy-Anchor's alpha = 32 amplifying them)
    args = [*FAST_RUN, "scheduler=step", "trainer.precision=64-true", *overrides, f"hydra.run.dir={run}"]
    done = run_entry("train.py", args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((run / "test_metrics.json").read_text()), torch.load(
        run / "checkpoints" / "last.ckpt", weights_only=False
    )["state_dict"]


def _same(a, b):
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    assert metrics_a == pytest.approx(metrics_b, abs=1e-9)
    assert all(torch.allclose(weights_a[k], weights_b[k], rtol=0, atol=1e-9) for k in weights_b)


@pytest.mark.slow  # seven entry points, five of them on several processes
@pytest.mark.skipif(sys.platform == "win32", reason="gloo runs on Linux and macOS")
def test_a_sharded_run_trains_as_a_replicated_one_and_resumes_on_3_ranks_or_1_as_it_would(tmp_path):
    from tests.conftest import run_entry

    ddp, sharded = ["trainer=ddp_sim"], ["loss.shard_proxies=true"]
    first = _train(tmp_path / "sharded", *ddp, *sharded, "trainer.max_epochs=1")
    reference = _train(tmp_path / "replicated", *ddp, "trainer.max_epochs=1")
    _same(first, reference)
    ckpt = tmp_path / "sharded" / "checkpoints" / "last.ckpt"
    payload = torch.load(ckpt, weights_only=False)
    assert payload["state_dict"]["loss._proxies.weight"].shape[0] == 6  # the whole bank
    state = payload["optimizer_states"][0]
    (bank,) = [g["params"][0] for g in state["param_groups"] if g["name"] == "loss/proxies"]
    assert state["state"][bank]["exp_avg"].shape[0] == 6
    # resumed on 3 processes (sharded) and on 1: as the replicated run resumed there goes on (BatchNorm's
    # statistics depend on the share of each process, so the reference is a resumed run too); the epoch
    # after the resumed one writes a checkpoint mid-run, which must leave the optimizer's slices alone
    for name, more in (("three", [*ddp, "trainer.devices=3"]), ("one", [])):
        resumed = _train(tmp_path / name, *more, *sharded, "trainer.max_epochs=3", f"ckpt_path={ckpt}")
        ref = tmp_path / "replicated" / "checkpoints" / "last.ckpt"
        _same(
            resumed,
            _train(tmp_path / f"{name}_replicated", *more, "trainer.max_epochs=3", f"ckpt_path={ref}"),
        )
    evaluated = run_entry("evaluate.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'evaluation'}"])
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    said = json.loads(ckpt.with_name("last.metrics.json").read_text())["metrics"]
    assert said == pytest.approx(first[0], abs=1e-6)


def test_sharding_is_refused_where_it_cannot_work(compose_cfg):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from dml.errors import UserError
    from dml.models.sharding import shard_proxies

    def module(loss: str, **trainer):
        cfg = compose_cfg([f"loss={loss}", "dataset=cub", "dataset.num_train_classes=4"])
        clip = {"gradient_clip_val": None, "gradient_clip_algorithm": "norm"} | trainer
        holder = torch.nn.Module()
        holder.loss, holder.trainer = instantiate(cfg.loss), SimpleNamespace(**clip)
        return holder

    with pytest.raises(UserError, match="has no class proxies to shard"):
        shard_proxies(module("contrastive"), 2, 0)
    with pytest.raises(UserError, match="over 5 processes needs at least 5 classes"):
        shard_proxies(module("proxy_anchor"), 5, 0)
    with pytest.raises(UserError, match="clip by value"):
        shard_proxies(module("proxy_anchor", gradient_clip_val=10.0), 2, 0)
    with pytest.raises(UserError, match="use bf16-mixed or 32-true"):
        shard_proxies(module("proxy_anchor", precision="16-mixed"), 2, 0)
    bf16 = module("proxy_anchor", precision="bf16-mixed")  # trainer=ddp's precision: no loss scaling
    shard_proxies(bf16, 2, 0)
    assert bf16.loss.bank.sharded
    one = module("proxy_anchor")
    shard_proxies(one, 1, 0)  # one process: nothing to shard
    assert not one.loss.bank.sharded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_resume_maps_the_checkpoint_instead_of_copying_it(tmp_path):
    """Each process of a sharded run keeps its slice of a bank it reads mapped: the rest stays in the
    page cache, shared (dml.checkpoints.AtomicCheckpointIO)."""
    from dml.checkpoints import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"bank": torch.randn(4096, 64)}}, path)
    bank = io.load_checkpoint(path)["state_dict"]["bank"]
    assert bank.device.type == "cpu"
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    assert any(lo <= bank.data_ptr() < hi for lo, hi in mapped), mapped
    io.save_checkpoint({"state_dict": {"bank": torch.zeros(4096, 64)}}, path)  # replaced by renaming:
    assert bank.abs().sum() > 0  # the mapped one reads as it was
