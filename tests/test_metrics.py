import math

import pytest
import torch
import torch.nn.functional as F

from dml.evaluation import knn, map_at_r, recall_at_k, retrieval_metrics

# Six points on the unit circle in 2-D (unit vectors by angle): neighbours follow the angle order.
ANGLES = torch.tensor([0.0, 0.1, 0.3, 1.0, 1.1, 2.0])
POINTS = torch.stack([torch.cos(ANGLES), torch.sin(ANGLES)], dim=1)
LABELS = torch.tensor([0, 0, 1, 1, 0, 1])


def test_knn_excludes_self_and_orders_by_similarity():
    idx = knn(POINTS, k=3, backend="torch")
    assert idx[0].tolist() == [1, 2, 3]
    assert idx[3].tolist() == [4, 2, 1]  # angular distances 0.1, 0.7, 0.9
    assert (idx != torch.arange(6)[:, None]).all()


def test_hand_computed_recall():
    # Nearest neighbours: 0->1 (hit), 1->0 (hit), 2->1 (miss), 3->4 (miss), 4->3 (miss), 5->4 (miss)
    # second neighbours:   0->2,       1->2,       2->0,       3->2 (hit),  4->2 (miss) 5->3 (hit)
    m = retrieval_metrics(POINTS, LABELS, ks=(1, 2), backend="torch", nmi=False)
    assert m["recall@1"] == pytest.approx(2 / 6)
    assert m["recall@2"] == pytest.approx(4 / 6)


def test_hand_computed_map_at_r():
    neighbour_labels = torch.tensor([[0, 1, 0], [1, 1, 0]])
    labels = torch.tensor([0, 1])
    r = torch.tensor([2, 2])
    m = map_at_r(neighbour_labels, labels, r)
    # query a: rel [1,0] -> P(1)=1 -> MAP 1/2 ; R-prec 1/2. query b: rel [1,1] -> MAP 1 ; R-prec 1.
    assert m["map@r"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["r_precision"] == pytest.approx((0.5 + 1.0) / 2)


def test_map_at_r_uses_each_query_own_r():
    neighbour_labels = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]])
    labels = torch.tensor([0, 1])
    r = torch.tensor([3, 1])
    m = map_at_r(neighbour_labels, labels, r)
    # query 0: rel [1,0,1] -> (1/1 + 2/3)/3 ; R-prec 2/3. query 1: rel [1] -> 1 ; 1.
    assert m["map@r"] == pytest.approx(((1 + 2 / 3) / 3 + 1) / 2)
    assert m["r_precision"] == pytest.approx((2 / 3 + 1) / 2)


def test_queries_without_positives_are_left_out_of_map():
    m = map_at_r(torch.tensor([[1], [0]]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert m["map@r"] == pytest.approx(1.0)
    assert math.isnan(map_at_r(torch.tensor([[1]]), torch.tensor([0]), torch.tensor([0]))["map@r"])


def brute_force_recall(x, y, ks):
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(x)):
            order = sorted(range(len(x)), key=lambda j: -sims[i, j].item())[:k]
            hits += any(y[j] == y[i] for j in order)
        out[f"recall@{k}"] = hits / len(x)
    return out


def test_recall_matches_brute_force_on_random_data():
    x = F.normalize(torch.randn(120, 16), dim=1)
    y = torch.randint(0, 7, (120,))
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8), backend="torch", nmi=False)
    for key, value in brute_force_recall(x, y, (1, 2, 4, 8)).items():
        assert m[key] == pytest.approx(value)


def test_torch_and_faiss_backends_agree():
    pytest.importorskip("faiss")
    x = F.normalize(torch.randn(300, 32), dim=1)
    y = torch.randint(0, 10, (300,))
    assert torch.equal(knn(x, k=20, backend="torch"), knn(x, k=20, backend="faiss"))
    a = retrieval_metrics(x, y, backend="torch", nmi=False)
    b = retrieval_metrics(x, y, backend="faiss", nmi=False)
    assert a == pytest.approx(b)


def test_query_reference_form():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ref = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7]])
    m = retrieval_metrics(
        q,
        torch.tensor([0, 0]),
        ks=(1, 2),
        reference=F.normalize(ref, dim=1),
        reference_labels=torch.tensor([0, 1, 0]),
        backend="torch",
        nmi=False,
    )
    # q0 -> ref0 (hit). q1 -> ref1 (miss), then ref2 (hit). R = 2 for both.
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["r_precision"] == pytest.approx((1.0 + 0.5) / 2)


def test_nmi_is_one_for_separated_clusters_and_repeatable():
    centers = torch.eye(4) * 10
    y = torch.arange(4).repeat_interleave(25)
    x = centers[y] + 0.01 * torch.randn(100, 4)
    a = retrieval_metrics(F.normalize(x, dim=1), y, nmi=True, backend="torch")
    assert a["nmi"] == pytest.approx(1.0)
    noisy = torch.randn(100, 4)
    assert (
        retrieval_metrics(noisy, y, backend="torch")["nmi"]
        == retrieval_metrics(noisy, y, backend="torch")["nmi"]
    )


def test_recall_at_k_direct():
    assert recall_at_k(torch.tensor([[1, 0], [1, 1]]), torch.tensor([0, 0]), (1, 2)) == {
        "recall@1": 0.0,
        "recall@2": 0.5,
    }


def uneven_batch(n_classes=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 12, (n_classes,), generator=g)
    y = torch.arange(n_classes).repeat_interleave(sizes)
    x = F.normalize(
        torch.randn(len(y), 24, generator=g) + 0.8 * torch.randn(n_classes, 24, generator=g)[y], dim=1
    )
    return x, y


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_agrees_with_pml_accuracy_calculator_on_uneven_classes(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    calc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = uneven_batch()
    calc = calc_mod.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision")
    )
    ref = calc.get_accuracy(x, y)
    ours = retrieval_metrics(x, y, ks=(1,), backend=backend, nmi=False)
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)


def test_recall_scan_matches_neighbour_search_query_gallery():
    x, y = uneven_batch(seed=3)
    q, g = x[::3], x
    qy = y[::3]
    ranks_based = retrieval_metrics(
        q, qy, ks=(1, 4, 16), reference=g, reference_labels=y, backend="torch", nmi=False
    )
    neighbours = knn(q, g, k=16, backend="torch")
    for k in (1, 4, 16):
        assert ranks_based[f"recall@{k}"] == pytest.approx(
            (y[neighbours[:, :k]] == qy[:, None]).any(1).float().mean().item()
        )


def test_nmi_plus_multiples():
    x, y = uneven_batch(n_classes=6)
    m = retrieval_metrics(x, y, backend="torch", nmi=True, nmi_multiples=(2, 5))
    assert set(m) >= {"nmi", "nmi+2x", "nmi+5x"} and all(0 <= m[k] <= 1 for k in ("nmi", "nmi+2x", "nmi+5x"))


@pytest.mark.parametrize(("n", "classes"), [(900, 200), (600, 3), (7, 7)])
def test_symmetric_block_scan_equals_the_plain_scan(monkeypatch, n, classes):
    from dml.evaluation import retrieval

    monkeypatch.setattr(retrieval, "_CHUNK_BYTES", 4 * 256 * 256)  # many blocks, uneven last ones
    g = torch.Generator().manual_seed(n)
    x = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    y[0] = 10_000  # a class of one: no positive
    ranks, nearest = retrieval._scan_symmetric(x, y, 5)
    plain_ranks, plain_nearest = retrieval._scan_torch(x, x, y, y, True, 5)
    assert torch.equal(ranks, plain_ranks) and torch.equal(nearest, plain_nearest)
    assert ranks[0] == torch.iinfo(torch.int64).max
