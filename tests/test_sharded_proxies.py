"""Class proxies sharded across ranks (dml.losses.sharded): exact against one process holding the whole
bank, on 2 and 3 gloo processes (each run in its own interpreter)."""

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
