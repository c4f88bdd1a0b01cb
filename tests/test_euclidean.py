"""Un-normalised embeddings (head.normalize=false): distances, losses, miners and retrieval in R^d."""

import pytest
import torch

from dml.config import compose
from dml.errors import UserError
from dml.evaluation import retrieval_metrics
from dml.functional import pairwise_distance, squared_distance
from dml.losses import EasyPositiveMiner, MarginLoss, SemiHardNegativeMiner, TripletLoss
from dml.models import LinearHead
from dml.tasks import train
from tests.conftest import FAST_RUN


def points(n=24, d=2, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, dtype=torch.float64, generator=g), torch.arange(
        n // 4
    ).repeat_interleave(4)


def test_free_distances_are_plain_euclidean():
    x, _ = points()
    assert torch.allclose(
        pairwise_distance(x, normalize=False).fill_diagonal_(0), torch.cdist(x, x), atol=1e-9
    )
    assert torch.allclose(squared_distance(x[:5], x[5:], normalize=False), torch.cdist(x[:5], x[5:]) ** 2)


def test_head_can_leave_embeddings_unnormalised():
    x = torch.randn(5, 7)
    assert torch.allclose(LinearHead(7, 3)(x).norm(dim=1), torch.ones(5))
    assert not torch.allclose(LinearHead(7, 3, normalize=False)(x).norm(dim=1), torch.ones(5))


def test_triplet_and_margin_in_the_plane_match_pytorch_metric_learning():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning.distances import LpDistance

    x, y = points()
    free = LpDistance(normalize_embeddings=False)
    ours = TripletLoss(0.2, normalize_embeddings=False)(x, y)
    ref = pml_losses.TripletMarginLoss(margin=0.2, distance=free)(x, y)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours.item() != pytest.approx(TripletLoss(0.2)(x, y).item()), "not the unit-circle loss"
    ours = MarginLoss(0.2, beta=1.2, learn_beta=False, normalize_embeddings=False)(x, y)
    ref = pml_losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=False, distance=free)(x, y)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_miners_rank_by_plane_distance():
    # The anchor's same-class points: one in its direction but far, one near at another angle.
    x = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.5], [-1.0, 0.0], [-5.0, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    plane = EasyPositiveMiner("hard", normalize_embeddings=False)
    a, p = plane.easy_positives(pairwise_distance(x, normalize=False), y)
    assert p[0] == 2, "nearest in the plane"
    a, p = plane.easy_positives(pairwise_distance(x), y)
    assert p[0] == 1, "nearest on the circle"
    assert len(SemiHardNegativeMiner(5.0, normalize_embeddings=False)(x, y)[0]) > 0
    with pytest.raises(ValueError, match="distance-weighted negatives assume unit-norm"):
        EasyPositiveMiner("distance_weighted", normalize_embeddings=False)


def test_retrieval_in_the_plane_ranks_by_euclidean_distance():
    x, y = points(n=60, seed=1)
    x = x.float()
    d = torch.cdist(x, x).fill_diagonal_(float("inf"))
    expected = (y[d.argmin(1)] == y).float().mean().item()
    got = retrieval_metrics(x, y, ks=(1,), metric="euclidean", nmi=False)
    assert got["recall@1"] == pytest.approx(expected)
    gallery = retrieval_metrics(
        x[:20], y[:20], ks=(1,), reference=x[20:], reference_labels=y[20:], metric="euclidean", nmi=False
    )
    assert gallery["recall@1"] == pytest.approx(
        (y[20:][torch.cdist(x[:20], x[20:]).argmin(1)] == y[:20]).float().mean().item()
    )


def test_training_in_the_plane(tmp_path):
    plane = [
        "head.normalize=false",
        "loss=triplet_random",
        "+loss.terms.triplet.loss.normalize_embeddings=false",
    ]
    metrics = train(compose([*FAST_RUN, "~logger", "trainer.max_epochs=1", *plane], output_dir=tmp_path))
    assert 0 <= metrics["test/recall@1"] <= 1
    with pytest.raises(UserError, match="normalise them: loss.terms.triplet.loss"):
        train(
            compose(
                [*FAST_RUN, "~logger", "head.normalize=false", "loss=triplet_random"],
                output_dir=tmp_path / "b",
            )
        )
