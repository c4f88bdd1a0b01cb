"""Pair/triplet losses, ProxyNCA and the miners against brute-force loops and pytorch-metric-learning."""

import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dml import functional
from dml.losses import (
    AntiCoLoss,
    ContrastiveLoss,
    DistanceWeightedMiner,
    EasyPositiveMiner,
    MarginLoss,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    ProxyNCALoss,
    RandomTripletMiner,
    SemiHardNegativeMiner,
    TripletLoss,
)
from dml.losses import tuples as tuples_module
from dml.losses.miners import distance_log_weights

DTYPES = [torch.float32, torch.float64]
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")


def batch(dtype, n=24, d=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def dist_of(x):
    x = F.normalize(x.double(), dim=1)
    return torch.cdist(x, x)


def triplets_of(y):
    n = len(y)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p and y[a] == y[p] and y[a] != y[q]
    ]


def mean_nonzero(values):
    values = [v for v in values if v > 0]
    return sum(values) / len(values) if values else 0.0


def close(a, b, tol=1e-5):
    assert float(a.detach() if torch.is_tensor(a) else a) == pytest.approx(
        float(b.detach() if torch.is_tensor(b) else b), rel=tol, abs=tol
    )


# --- brute force ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_brute_force(dtype):
    x, y = batch(dtype)
    d = dist_of(x)
    pos = [
        max(0.0, d[i, j].item() - 0.1)
        for i in range(len(y))
        for j in range(len(y))
        if i != j and y[i] == y[j]
    ]
    neg = [max(0.0, 0.9 - d[i, j].item()) for i in range(len(y)) for j in range(len(y)) if y[i] != y[j]]
    close(ContrastiveLoss(pos_margin=0.1, neg_margin=0.9)(x, y), mean_nonzero(pos) + mean_nonzero(neg))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_all_triplets_brute_force(dtype, margin):
    x, y = batch(dtype)
    d = dist_of(x)
    values = [max(0.0, (d[a, p] - d[a, n] + margin).item()) for a, p, n in triplets_of(y)]
    close(TripletLoss(margin)(x, y), mean_nonzero(values))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_squared_distance_mean_over_all_triplets_brute_force(dtype):
    """The EPS paper's D (squared) and its framework's reduction (every mined triplet counts)."""
    x, y = batch(dtype)
    d2 = dist_of(x) ** 2
    values = [max(0.0, (d2[a, p] - d2[a, n] + 0.2).item()) for a, p, n in triplets_of(y)]
    close(TripletLoss(0.2, squared=True, reduction="mean")(x, y), sum(values) / len(values))
    close(TripletLoss(0.2, squared=True)(x, y), mean_nonzero(values))
    with pytest.raises(ValueError, match="reduction"):
        TripletLoss(reduction="sum")


def test_triplet_chunking_gives_the_same_value(monkeypatch):
    x, y = batch(torch.float64, n=40)
    whole = TripletLoss(0.3)(x, y)
    monkeypatch.setattr(tuples_module, "MAX_TRIPLETS_PER_CHUNK", 7)
    close(TripletLoss(0.3)(x, y), whole, tol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_class", [False, True])
def test_margin_brute_force(dtype, per_class):
    x, y = batch(dtype)
    loss = MarginLoss(alpha=0.2, beta=1.0, nu=0.01, per_class=per_class, num_classes=5)
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.8, 1.2, len(loss.beta)))
    d = dist_of(x)
    total, count, reg = 0.0, 0, 0.0
    for a, p, n in triplets_of(y):
        beta = loss.beta[y[a]].item() if per_class else loss.beta.item()
        pos, neg = max(0.0, d[a, p].item() - beta + 0.2), max(0.0, beta - d[a, n].item() + 0.2)
        total += pos + neg
        count += (pos > 0) + (neg > 0)
        reg += beta
    expected = total / count + (0.01 * reg / count if per_class else 0.01 * loss.beta.item())
    close(loss(x, y), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_similarity_brute_force(dtype):
    x, y = batch(dtype)
    s = 1 - dist_of(x) ** 2 / 2
    per_anchor = []
    for i in range(len(y)):
        pos = sum(torch.exp(-2 * (s[i, j] - 0.5)) for j in range(len(y)) if j != i and y[j] == y[i])
        neg = sum(torch.exp(50 * (s[i, j] - 0.5)) for j in range(len(y)) if y[j] != y[i])
        per_anchor.append(torch.log(1 + pos) / 2 + torch.log(1 + neg) / 50)
    close(MultiSimilarityLoss(2, 50, 0.5)(x, y), sum(per_anchor) / len(y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_positive", [False, True])
def test_proxy_nca_brute_force(dtype, exclude_positive):
    x, y = batch(dtype)
    loss = ProxyNCALoss(num_classes=6, embedding_size=8, scale=4.0, exclude_positive=exclude_positive).to(
        dtype
    )
    xn = F.normalize(x.double(), dim=1)
    pn = F.normalize(loss.proxies.weight.double(), dim=1)
    values = []
    for i in range(len(y)):
        logits = [-4.0 * ((xn[i] - pn[c]) ** 2).sum() for c in range(6)]
        denom = sum(torch.exp(v) for c, v in enumerate(logits) if not (exclude_positive and c == y[i]))
        values.append(-torch.log(torch.exp(logits[y[i]]) / denom))
    close(loss(x, y), sum(values) / len(values))


# --- miners, brute force ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_easy_positive_is_the_nearest_same_class_sample(dtype):
    x, y = batch(dtype)
    d = dist_of(x)
    a, p, n = EasyPositiveMiner(negatives="hard")(x, y)
    for anchor, positive, negative in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        same = [j for j in range(len(y)) if j != anchor and y[j] == y[anchor]]
        other = [j for j in range(len(y)) if y[j] != y[anchor]]
        assert positive == min(same, key=lambda j: d[anchor, j].item())
        assert negative == min(other, key=lambda j: d[anchor, j].item())
    assert sorted(a.tolist()) == [i for i in range(len(y)) if (y == y[i]).sum() > 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_easy_positive_semihard_negatives_are_relative_to_the_easy_positive(dtype):
    x, y = batch(dtype)
    d = dist_of(x)
    a, p, n = EasyPositiveMiner(negatives="semihard", margin=0.3)(x, y)
    expected = set()
    for anchor in range(len(y)):
        same = [j for j in range(len(y)) if j != anchor and y[j] == y[anchor]]
        if not same:
            continue
        pos = min(same, key=lambda j: d[anchor, j].item())
        for neg in range(len(y)):
            if y[neg] != y[anchor] and 0 < d[anchor, neg] - d[anchor, pos] <= 0.3:
                expected.add((anchor, pos, neg))
    assert set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_semihard_miner_brute_force(dtype):
    x, y = batch(dtype)
    d = dist_of(x)
    expected = {t for t in triplets_of(y) if 0 < d[t[0], t[2]] - d[t[0], t[1]] <= 0.2}
    a, p, n = SemiHardNegativeMiner(0.2)(x, y)
    assert set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_easy_positive_per_anchor_draws_one_semihard_negative_or_falls_back(dtype):
    x, y = batch(dtype, n=30)
    d = dist_of(x)
    a, p, n = EasyPositiveMiner("semihard", margin=0.2, per_anchor=True, seed=2)(x, y)
    assert len(set(a.tolist())) == len(a), "one triplet per anchor"
    expected_anchors = [i for i in range(len(y)) if (y == y[i]).sum() > 1 and (y != y[i]).any()]
    assert sorted(a.tolist()) == expected_anchors
    fallbacks = 0
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert d[i, j] == min(d[i, t] for t in range(len(y)) if t != i and y[t] == y[i])
        semihard = [t for t in range(len(y)) if y[t] != y[i] and 0 < d[i, t] - d[i, j] <= 0.2]
        assert y[k] != y[i]
        if semihard:
            assert k in semihard
        else:
            fallbacks += 1
    assert fallbacks < len(a)
    with pytest.raises(ValueError, match="per_anchor"):
        EasyPositiveMiner("all", per_anchor=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_similarity_negatives_relative_to_the_easy_positive(dtype):
    x, y = batch(dtype)
    s = F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    expected = set()
    for i in range(len(y)):
        pos = [k for k in range(len(y)) if k != i and y[k] == y[i]]
        if pos:
            easy = max(s[i, k] for k in pos)
            expected |= {(i, j) for j in range(len(y)) if y[j] != y[i] and s[i, j] + 0.1 > easy}
    miner = MultiSimilarityMiner(0.1, positives="easy", negative_reference="easy_positive")
    _, _, a2, n = miner(x, y)
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == expected
    _, _, a2h, _ = MultiSimilarityMiner(0.1, positives="easy")(x, y)
    assert len(a2) < len(a2h), "fewer negatives beat the easiest positive than the hardest"


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_similarity_miner_brute_force(dtype):
    x, y = batch(dtype)
    s = 1 - dist_of(x) ** 2 / 2
    pos_pairs, neg_pairs = set(), set()
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [j for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        pos_pairs |= {(i, j) for j in pos if s[i, j] - 0.1 < max(s[i, k] for k in neg)}
        neg_pairs |= {(i, j) for j in neg if s[i, j] + 0.1 > min(s[i, k] for k in pos)}
    a1, p, a2, n = MultiSimilarityMiner(0.1)(x, y)
    assert set(zip(a1.tolist(), p.tolist(), strict=True)) == pos_pairs
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == neg_pairs
    a1, p, a2e, ne = MultiSimilarityMiner(0.1, positives="easy")(x, y)
    assert torch.equal(a2e, a2) and torch.equal(ne, n)
    for i, j in zip(a1.tolist(), p.tolist(), strict=True):
        assert s[i, j] == max(s[i, k] for k in range(len(y)) if k != i and y[k] == y[i])


def test_distance_log_weights_follow_the_formula():
    x, _ = batch(torch.float64, d=16)
    d = dist_of(x)
    log_w = distance_log_weights(d, 16, cutoff=0.5)
    for i, j in [(0, 1), (2, 5), (3, 7)]:
        dij = max(d[i, j].item(), 0.5)
        raw = dij ** (2 - 16) * (1 - dij * dij / 4) ** (-(16 - 3) / 2)
        assert log_w[i, j].item() == pytest.approx(math.log(raw), rel=1e-12)


def spread_batch(dtype, d, n=32, classes=4, seed=0):
    """Unit vectors around one shared direction: pairwise distances spread over about 0.6-1.35, inside
    the non-zero-loss cut-off, in any dimension (random vectors in 2048-d all sit at about sqrt(2))."""
    g = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    own = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    mix = torch.linspace(0.25, 0.75, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x = F.normalize(mix[:, None] * shared + (1 - mix[:, None]) * own, dim=1)
    return x.to(dtype), torch.arange(n) % classes


def reference_negative_probabilities(dist, labels, dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Each row's draw over its negatives inside the cut-off, normalised in log space with math.*"""
    n = len(labels)
    probs = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        logs = {}
        for j in range(n):
            dij = float(dist[i, j])
            if labels[j] != labels[i] and dij < nonzero_loss_cutoff:
                c = max(dij, cutoff)
                logs[j] = (2 - dim) * math.log(c) - (dim - 3) / 2 * math.log(1 - c * c / 4)
        if not logs:  # no negative can give a loss: uniform over the negatives
            logs = {j: 0.0 for j in range(n) if labels[j] != labels[i]}
        top = max(logs.values())
        total = math.fsum(math.exp(v - top) for v in logs.values())
        for j, v in logs.items():
            probs[i, j] = math.exp(v - top) / total
    return probs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [128, 1024, 2048])
def test_distance_weighted_probabilities_are_exact_in_high_dimension(dtype, dim):
    """The row maximum is taken over the valid negatives only: normalising against self or positives
    (much closer, so weighted far higher) underflowed the negatives for dim >= 1024."""
    x, y = spread_batch(dtype, dim)
    dist = functional.pairwise_distance(x)
    inside = (dist < 1.4) & (y[:, None] != y[None, :])
    assert inside.sum(1).min() >= 3, "the fixture must put several negatives of every row inside the cut-off"
    ours = DistanceWeightedMiner().negative_weights(x, y)
    expected = reference_negative_probabilities(dist, y, dim)
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-300)
    assert torch.allclose(ours.sum(1), torch.ones(len(y), dtype=torch.float64))
    # Not degenerate: the weights differ from uniform over the row's candidates.
    assert (expected.max(1).values > 1.5 / inside.sum(1)).all()
    eps = EasyPositiveMiner("distance_weighted", seed=1)
    a, _, n = eps(x, y)
    assert (expected[a, n] > 0).all()


SAMPLING_MINERS = {
    "distance_weighted": lambda: DistanceWeightedMiner(seed=1),
    "random": lambda: RandomTripletMiner(2, seed=1),
    "eps_random": lambda: EasyPositiveMiner("random", seed=1),
    "eps_distance_weighted": lambda: EasyPositiveMiner("distance_weighted", seed=1),
}


@pytest.mark.parametrize("name", sorted(SAMPLING_MINERS))
def test_sampling_miners_give_valid_triplets_reproducible_per_seed(name):
    x, y = batch(torch.float32, n=30, d=16)
    a, p, n = SAMPLING_MINERS[name]()(x, y)
    assert len(a) > 0
    assert (y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all()
    assert all(torch.equal(u, v) for u, v in zip((a, p, n), SAMPLING_MINERS[name]()(x, y), strict=True))


def test_distance_weighted_negatives_have_weight():
    x, y = batch(torch.float32, n=30, d=16)
    miner = DistanceWeightedMiner(seed=1)
    a, _, n = miner(x, y)
    assert (miner.negative_weights(x, y)[a, n] > 0).all()


# --- pytorch-metric-learning as oracle ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_pml_proxy_nca(dtype):
    x, y = batch(dtype)
    ours = ProxyNCALoss(num_classes=6, embedding_size=8, scale=9.0).to(dtype)
    ref = pml_losses.ProxyNCALoss(num_classes=6, embedding_size=8, softmax_scale=9.0).to(dtype)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies.weight)
    close(ours(x, y), ref(x, y), tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_pml_multi_similarity_and_miner(dtype):
    x, y = batch(dtype)
    ours = MultiSimilarityLoss(2, 50, 0.5)(x, y, MultiSimilarityMiner(0.1)(x, y))
    ref_tuples = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    ref = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(x, y, ref_tuples)
    close(ours, ref, tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_pml_triplet_semihard(dtype):
    x, y = batch(dtype)
    ours = TripletLoss(0.2)(x, y, SemiHardNegativeMiner(0.2)(x, y))
    ref_tuples = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(x, y)
    ref = pml_losses.TripletMarginLoss(margin=0.2)(x, y, ref_tuples)
    close(ours, ref, tol=1e-6)
    close(TripletLoss(0.2)(x, y), pml_losses.TripletMarginLoss(margin=0.2)(x, y), tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_class", [False, True])
def test_agrees_with_pml_margin(dtype, per_class):
    x, y = batch(dtype)
    triplets = DistanceWeightedMiner(seed=0)(x, y)
    ours = MarginLoss(alpha=0.2, beta=1.2, nu=0.0, per_class=per_class, num_classes=5)
    ref = pml_losses.MarginLoss(
        margin=0.2, beta=1.2, nu=0.0, learn_beta=True, num_classes=5 if per_class else None
    )
    close(ours(x, y, triplets), ref(x, y, triplets), tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_pml_contrastive(dtype):
    x, y = batch(dtype)
    close(
        ContrastiveLoss(0.0, 1.0)(x, y),
        pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1)(x, y),
        tol=1e-6,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_easy_positives_agree_with_pml_batch_easy_hard_miner(dtype):
    x, y = batch(dtype)
    a1, p, _, _ = pml_miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="all")(x, y)
    ours = EasyPositiveMiner("hard")
    da, dp = ours.easy_positives(ours_dist := functional.pairwise_distance(x), y)
    assert ours_dist.shape == (len(y), len(y))
    assert dict(zip(a1.tolist(), p.tolist(), strict=True)) == dict(zip(da.tolist(), dp.tolist(), strict=True))


# --- precision and memory ----------------------------------------------------------------------------------
LOSSES = {
    "contrastive": lambda: (ContrastiveLoss(), None),
    "triplet": lambda: (TripletLoss(), None),
    "triplet_eps": lambda: (TripletLoss(), EasyPositiveMiner("semihard")),
    "margin_dw": lambda: (MarginLoss(), DistanceWeightedMiner()),
    "margin_eps": lambda: (MarginLoss(), EasyPositiveMiner("distance_weighted")),
    "ms": lambda: (MultiSimilarityLoss(), MultiSimilarityMiner()),
    "ms_eps": lambda: (MultiSimilarityLoss(), MultiSimilarityMiner(positives="easy")),
    "proxy_nca": lambda: (ProxyNCALoss(5, 8), None),
    "antico_pair": lambda: (AntiCoLoss("pair"), None),
    "antico_batch_proxy": lambda: (AntiCoLoss("batch_proxy", num_classes=5, embedding_size=8), None),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_under_bf16_autocast(name):
    loss, miner = LOSSES[name]()
    x, y = batch(torch.float32)
    x = (x * 30).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.nn.functional.linear(x, torch.eye(8))  # a bf16 activation, as a network would give
        value = loss(emb, y) if miner is None else loss(emb, y, miner(emb, y))
    value.backward()
    assert torch.isfinite(value)
    grads = [x.grad] + [p.grad for p in loss.parameters()]
    grads = [g for g in grads if g is not None]  # proxy-only AntiCo leaves x without a gradient
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_batch_of_1000_never_builds_a_cube():
    """All-triplet losses and the semi-hard miner at B=1000: a B^3 float tensor alone would be 4 GB."""
    code = textwrap.dedent("""
        import torch
        from dml.losses import TripletLoss, MarginLoss, SemiHardNegativeMiner, EasyPositiveMiner
        torch.manual_seed(0)
        x = torch.randn(1000, 64, requires_grad=True)
        y = torch.arange(250).repeat_interleave(4)
        for loss, miner in ((TripletLoss(), None), (MarginLoss(learn_beta=False), None),
                            (TripletLoss(), SemiHardNegativeMiner()), (TripletLoss(), EasyPositiveMiner("all"))):
            value = loss(x, y) if miner is None else loss(x, y, miner(x, y))
            value.backward()
        # VmHWM: this process's own peak (getrusage's ru_maxrss keeps the peak of the process it was
        # forked from, here the test runner)
        peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(int(peak.split()[1]) // 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 2500, f"peak RSS {proc.stdout.strip()} MB"
