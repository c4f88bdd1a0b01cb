"""Negative-proxy sampling (dml.losses.proxy_sampling) on one process: what a draw holds, the terms over
it equal one process holding just the drawn proxies, and the composite loss draws in training only.
Sharded over ranks: tests/test_sharded_proxies.py."""

import math

import pytest
import torch
from hydra.utils import instantiate

from dml.losses import CompositeLoss
from dml.losses.proxy import ProxyBank
from dml.losses.proxy_sampling import ProxySampler
from tests.sharded_proxies_worker import SAMPLED, bank, data, on_these_classes, sampled_step, terms


def test_a_draw_holds_every_positive_and_its_share_of_the_others_each_counting_once():
    labels = torch.tensor([3, 3, 7, 7, 7, 12, 40, 40])
    proxies = ProxyBank(50, 4)
    active = ProxySampler(0.2, seed=1)(proxies, labels)
    counted: dict[int, float] = {}
    for c, w in zip(active.classes.tolist(), active.weights.tolist(), strict=True):
        counted[c] = counted.get(c, 0.0) + w
    seen = {c for c, w in counted.items() if w > 0}
    assert {3, 7, 12, 40} <= seen
    assert all(w == pytest.approx(1.0) for c, w in counted.items() if c in seen)
    negatives = active.classes[len(labels) :]
    assert len(negatives) == math.ceil(0.2 * 50) and len(set(negatives.tolist())) == len(negatives)
    assert len(seen) == 4 + len(set(negatives.tolist()) - {3, 7, 12, 40})
    assert active.count.item() == pytest.approx(len(seen))
    again = ProxySampler(0.2, seed=1)(proxies, labels)
    assert torch.equal(again.rows, active.rows)
    assert not torch.equal(ProxySampler(0.2, seed=2)(proxies, labels).rows, active.rows)


def test_a_draw_follows_from_the_seed_and_the_count_so_replicated_ranks_and_a_resume_draw_alike():
    proxies, labels = ProxyBank(50, 4), torch.tensor([1, 1, 9, 9])
    rank0, rank1 = ProxySampler(0.2, seed=5), ProxySampler(0.2, seed=5)  # one replicated bank, two ranks
    first = [rank0(proxies, labels).rows for _ in range(3)]
    assert all(torch.equal(rows, rank1(proxies, labels).rows) for rows in first)
    assert not torch.equal(first[0], first[1])  # a fresh draw each step
    resumed = ProxySampler(0.2, seed=5)  # from a checkpoint: the count goes on
    resumed.load_generator_states(rank0.generator_states())
    assert torch.equal(resumed(proxies, labels).rows, rank0(proxies, labels).rows)
    own = ProxySampler(0.2, seed=5)
    own.for_rank(1)  # a sharded bank's rank 1 draws from streams of its own
    assert not torch.equal(own(proxies, labels).rows, first[0])


@pytest.mark.parametrize("name", SAMPLED)
def test_every_term_over_a_draw_equals_one_process_holding_just_the_drawn_proxies(name):
    torch.set_default_dtype(torch.float64)
    try:
        x, y = data()
        few = y % 4  # most classes absent from the batch
        got, drawn = sampled_step(terms()[name], bank(), ProxySampler(0.3, seed=4), x, few)
        seen = sorted(set(drawn))
        assert {0, 1, 2, 3} <= set(seen) and len(seen) < 10
        expected = on_these_classes(terms()[name], seen, x, few)
        for key in ("loss", "x_grad", "proxy_grad", "proxies"):
            assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-10), key
    finally:
        torch.set_default_dtype(torch.float32)


def _composite(rate: float) -> CompositeLoss:
    torch.manual_seed(0)
    anchor = {"_target_": "dml.losses.ProxyAnchorLoss", "_partial_": True}
    antico = {"_target_": "dml.losses.AntiCoLoss", "_partial_": True, "variant": "all_proxy", "form": "neg"}
    return instantiate(
        {
            "_target_": "dml.losses.CompositeLoss",
            "_convert_": "partial",
            "terms": {"anchor": {"loss": anchor}, "antico": {"loss": antico, "weight": 0.5}},
            "num_classes": 40,
            "embedding_size": 8,
            "proxy_sample_rate": rate,
            "proxy_sample_seed": 3,
        }
    )


def test_the_composite_loss_samples_in_training_and_sees_every_proxy_in_evaluation():
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    sampled, whole = _composite(0.25), _composite(1.0)
    assert whole.sampler is None and isinstance(sampled.sampler, ProxySampler)
    assert torch.equal(sampled.bank.weight, whole.bank.weight)
    assert not torch.allclose(sampled(x, y)["loss"], whole(x, y)["loss"])  # a sample of the negatives
    assert sampled.bank.active is None  # the draw lasts one step
    sampled.eval(), whole.eval()
    assert torch.equal(sampled(x, y)["loss"], whole(x, y)["loss"])
    assert "sampler" in sampled.random_state()  # its generator goes into checkpoints


def test_a_sample_rate_out_of_range_or_without_proxies_is_refused():
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        ProxySampler(1.5)
    pair = {"_target_": "dml.losses.ContrastiveLoss"}
    with pytest.raises(ValueError, match="has no class proxies to sample: set loss.proxy_sample_rate=1"):
        CompositeLoss({"pair": {"loss": instantiate(pair)}}, 10, 8, proxy_sample_rate=0.5)
