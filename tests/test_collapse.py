import math

import pytest
import torch
import torch.nn.functional as F

from dml.evaluation import collapse_metrics, distance_ratio, effective_rank, mean_class_coding_rate
from dml.losses import coding_rate


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)
    assert effective_rank(torch.ones(10, 8)) == pytest.approx(1.0)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)


def test_distance_ratio_by_hand():
    # class 0 at (0,0),(0,2); class 1 at (10,0),(10,2): intra mean 2, centroids (0,1),(10,1) apart by 10.
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    assert distance_ratio(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.2)


def test_class_coding_rate_averages_classes():
    x = F.normalize(torch.randn(12, 6, dtype=torch.float64), dim=1)
    y = torch.tensor([0] * 5 + [1] * 6 + [2])  # class 2 is a singleton and is left out
    expected = (coding_rate(x[:5]).item() + coding_rate(x[5:11]).item()) / 2
    assert mean_class_coding_rate(x, y) == pytest.approx(expected)


def test_collapsed_classes_score_lower_than_spread_ones():
    y = torch.arange(4).repeat_interleave(25)
    centers = F.normalize(torch.randn(4, 16), dim=1)
    collapsed = F.normalize(centers[y] + 1e-4 * torch.randn(100, 16), dim=1)
    spread = F.normalize(centers[y] + 0.8 * torch.randn(100, 16), dim=1)
    a, b = collapse_metrics(collapsed, y), collapse_metrics(spread, y)
    assert a["class_coding_rate"] < b["class_coding_rate"]
    assert a["distance_ratio"] < b["distance_ratio"]
    assert a["effective_rank"] < b["effective_rank"]
    assert all(math.isfinite(v) for v in a.values())
