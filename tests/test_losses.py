import math

import pytest
import torch
import torch.nn.functional as F

from dml.losses import AntiCoLoss, CompositeLoss, ProxyAnchorLoss, ProxyBank, coding_rate

DTYPES = [torch.float32, torch.float64]


def brute_force_proxy_anchor(x, labels, proxies, alpha, delta):
    """Proxy-Anchor by explicit loops over proxies and samples (Kim et al. 2020, eq. 4)."""
    x = F.normalize(x, dim=1)
    p = F.normalize(proxies, dim=1)
    num_classes = p.shape[0]
    pos_sum, neg_sum, n_pos = 0.0, 0.0, 0
    for c in range(num_classes):
        pos = [torch.exp(-alpha * (x[i] @ p[c] - delta)) for i in range(len(x)) if labels[i] == c]
        neg = [torch.exp(alpha * (x[i] @ p[c] + delta)) for i in range(len(x)) if labels[i] != c]
        if pos:
            pos_sum = pos_sum + torch.log(1 + sum(pos))
            n_pos += 1
        neg_sum = neg_sum + torch.log(1 + (sum(neg) if neg else 0.0))
    return pos_sum / n_pos + neg_sum / num_classes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "delta"), [(32.0, 0.1), (64.0, 0.1), (16.0, 0.0)])
def test_proxy_anchor_matches_brute_force(dtype, alpha, delta):
    x = torch.randn(20, 8, dtype=dtype)
    labels = torch.randint(0, 5, (20,))
    loss = ProxyAnchorLoss(num_classes=7, embedding_size=8, alpha=alpha, delta=delta).to(dtype)
    expected = brute_force_proxy_anchor(x.double(), labels, loss.proxies.weight.double(), alpha, delta)
    torch.testing.assert_close(loss(x, labels).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_proxy_anchor_matches_pytorch_metric_learning(dtype):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x = torch.randn(32, 16, dtype=dtype)
    labels = torch.randint(0, 6, (32,))
    ours = ProxyAnchorLoss(num_classes=10, embedding_size=16, alpha=32, delta=0.1).to(dtype)
    ref = pml.ProxyAnchorLoss(num_classes=10, embedding_size=16, margin=0.1, alpha=32).to(dtype)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies.weight)
    torch.testing.assert_close(ours(x, labels).to(dtype), ref(x, labels), rtol=1e-6, atol=1e-6)


def test_proxy_anchor_stable_under_bf16_autocast_and_rejects_bad_labels():
    x = torch.randn(16, 8, requires_grad=True)
    labels = torch.randint(0, 4, (16,))
    loss = ProxyAnchorLoss(num_classes=4, embedding_size=8, alpha=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x * 100, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="labels must lie in"):
        loss(x, torch.full((16,), 4))


def reference_rate(z, c):
    z = z.double()
    d = z.shape[1]
    return 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + c * z.T @ z)


@pytest.mark.parametrize(("n", "d"), [(5, 32), (64, 16), (20, 20)])
def test_coding_rate_matches_float64_reference_on_both_gram_sides(n, d):
    z = torch.randn(n, d, dtype=torch.float64)
    for scale, c in (("mcr2", d / (n * 0.5)), ("official", n / (d * 0.5))):
        value = coding_rate(z, eps=0.5, scale=scale)
        assert value.dtype == torch.float64
        expected = reference_rate(z, c)
        assert abs(value.item() - expected.item()) / abs(expected.item()) < 1e-6


def test_coding_rate_finite_on_collapsed_input_and_under_autocast():
    z = F.normalize(torch.ones(50, 16), dim=1).requires_grad_()
    value = coding_rate(z)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert coding_rate(torch.randn(10, 4)).dtype == torch.float32
    # A collapsed set codes with fewer bits than a spread one.
    assert coding_rate(torch.ones(8, 8)) < coding_rate(torch.eye(8))


def test_antico_batch_proxy_is_the_official_formula():
    bank = ProxyBank(10, 12)
    loss = AntiCoLoss(variant="batch_proxy", eps=0.5, proxies=bank)
    labels = torch.tensor([3, 3, 1, 7, 1])
    p = F.normalize(bank.weight[torch.tensor([1, 3, 7])], dim=1).double()
    m, d = 3, 12
    expected = torch.exp(-reference_rate(p, m / (d * 0.5)))
    torch.testing.assert_close(loss(torch.randn(5, 12), labels).double(), expected)


def test_antico_variants_and_forms():
    bank = ProxyBank(6, 8)
    x = F.normalize(torch.randn(10, 8), dim=1)
    labels = torch.randint(0, 6, (10,))
    all_proxy = AntiCoLoss("all_proxy", proxies=bank, form="neg", gamma=2.0)
    torch.testing.assert_close(all_proxy(x, labels), -2.0 * coding_rate(bank.normalized(), scale="official"))
    pair = AntiCoLoss("pair")
    torch.testing.assert_close(pair(x, labels), torch.exp(-coding_rate(x, scale="mcr2")))
    assert pair.proxies is None
    # Proxy variants leave the embeddings without gradient: only the proxies move.
    x.requires_grad_()
    AntiCoLoss("batch_proxy", proxies=bank)(x, labels).backward()
    assert x.grad is None and bank.weight.grad is not None
    with pytest.raises(ValueError, match="variant"):
        AntiCoLoss("nope")


def test_scale_free_antico_ignores_the_batch_s_size_but_not_its_shape():
    torch.manual_seed(0)
    z = torch.randn(30, 2) * torch.tensor([3.0, 0.5])
    loss = AntiCoLoss("pair", form="neg", scale_free=True)
    # growing the batch leaves it unchanged (plain -R keeps falling as the plane grows) ...
    torch.testing.assert_close(loss(10 * z, None), loss(z, None))
    assert AntiCoLoss("pair", form="neg")(10 * z, None) < AntiCoLoss("pair", form="neg")(z, None) - 1
    # ... it is -R of the batch at mean squared norm 1, and filling the plane evenly lowers it
    rms = z.pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(loss(z, None), -coding_rate(z / rms, scale="mcr2"))
    assert loss(torch.randn(30, 2), None) < loss(z, None)
    # on unit vectors it is the plain rate, and its gradient reaches the embeddings
    x = F.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    torch.testing.assert_close(
        AntiCoLoss("pair", scale_free=True)(x, None), AntiCoLoss("pair")(x, None), rtol=1e-4, atol=1e-7
    )
    AntiCoLoss("pair", form="neg", scale_free=True)(x, None).backward()
    assert x.grad is not None and x.grad.norm() > 0
    with pytest.raises(ValueError, match="scale_free applies to the pair variant"):
        AntiCoLoss("batch_proxy", scale_free=True, num_classes=3, embedding_size=8)


def test_composite_shares_one_proxy_bank_and_weights_terms():
    from functools import partial

    loss = CompositeLoss(
        terms={
            "proxy_anchor": {"loss": partial(ProxyAnchorLoss, alpha=32), "weight": 2.0},
            "antico": {"loss": partial(AntiCoLoss, variant="batch_proxy"), "weight": 0.5},
        },
        num_classes=5,
        embedding_size=8,
    )
    assert loss.terms["proxy_anchor"].loss.proxies is loss.terms["antico"].loss.proxies
    assert sum(p.numel() for p in loss.parameters()) == 5 * 8
    x, labels = torch.randn(10, 8), torch.randint(0, 5, (10,))
    out = loss(x, labels)
    expected = 2.0 * out["proxy_anchor"] + 0.5 * out["antico"]
    assert math.isclose(out["loss"].item(), expected.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="at least one term"):
        CompositeLoss({}, 5, 8)


def test_loss_parameter_groups_take_their_own_weight_decay_first():
    from dml.losses import CompositeLoss, MarginLoss, ProxyAnchorLoss

    composite = CompositeLoss(
        {
            "proxy_anchor": {"loss": lambda proxies: ProxyAnchorLoss(proxies=proxies)},
            "margin": {"loss": MarginLoss(beta_lr=5e-4, beta_weight_decay=0.0)},
        },
        num_classes=5,
        embedding_size=8,
        proxy_init_std=0.125,
    )
    groups = {g["name"]: g for g in composite.param_groups(lr=0.1, weight_decay=3e-4)}
    assert groups["loss/proxies"]["lr"] == 0.1 and groups["loss/proxies"]["weight_decay"] == 3e-4
    assert groups["loss/margin"]["lr"] == 5e-4 and groups["loss/margin"]["weight_decay"] == 0.0
    assert "weight_decay" not in composite.param_groups(lr=0.1)[0], "None keeps the optimizer's"
    torch.manual_seed(0)
    bank = CompositeLoss(
        {"pa": {"loss": lambda proxies: ProxyAnchorLoss(proxies=proxies)}}, 400, 64, proxy_init_std=0.125
    ).proxies.weight
    assert bank.std().item() == pytest.approx(0.125, rel=0.02)
