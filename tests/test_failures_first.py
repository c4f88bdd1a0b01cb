"""Failures first (dml.evaluation.failures): the search page and the run's retrieval picture show the
queries whose first neighbour is of another class first, worst first, then a sample of successes."""

import json
import re

import torch

from dml.evaluation.failures import failures_first
from dml.inference import Embeddings
from dml.inference.index import SearchResult
from dml.inference.results import results_json, results_page


def test_failures_come_first_worst_first_then_successes_at_random_then_the_unjudged():
    queries = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])
    neighbours = torch.tensor(
        [
            [0, 9, 9],  # success
            [9, 1, 9],  # fails, right at rank 2
            [9, 9, 9],  # fails, never right: worst
            [3, 3, 3],  # success
            [9, 9, 4],  # fails, right at rank 3
            [9, 9, 9],  # fails, never right, but less sure of its wrong neighbour than query 2
            [-1, 6, 6],  # first neighbour without a class: unjudged
            [1, 2, 3],  # query without a class: unjudged
        ]
    )
    first = torch.tensor([0.9, 0.8, 0.95, 0.9, 0.7, 0.6, 0.5, 0.5])
    shown = failures_first(queries, neighbours, first, shown=7)
    assert shown.order[:4] == [2, 5, 4, 1]
    assert sorted(shown.order[4:6]) == [0, 3] and shown.order[6] == 6
    assert (shown.failures, shown.successes, shown.sampled, shown.unjudged) == (4, 2, 2, 2)
    assert shown.summary() == (
        "8 queries: 4 fail (their first neighbour is of another class), all shown first, worst first; "
        "2 succeed, 2 of them shown at random; 2 without a class"
    )
    few = failures_first(queries, neighbours, first, shown=2)
    assert few.order == [2, 5] and "2 shown first, worst first" in few.summary()
    by_distance = failures_first(queries, neighbours, first, higher_is_better=False, shown=2)
    assert by_distance.order == [5, 2]  # the closer wrong neighbour is the surer mistake


def test_the_search_page_and_json_put_the_failures_first_with_a_summary(test_split, tmp_path):
    labels = torch.tensor([0, 1, 2])
    queries = Embeddings(test_split.vectors[:3], ["a.png", "b.png", "c.png"], labels, "model.ckpt", "0" * 64)
    result = SearchResult(
        torch.tensor([[5, 6], [7, 8], [9, 10]]),
        torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.99, 0.5]]),
        [["n5", "n6"], ["n7", "n8"], ["n9", "n10"]],
        torch.tensor([[0, 4], [4, 1], [4, 4]]),
        "similarity",
    )
    page = results_page(
        queries, result, lambda name: None, "model.ckpt", 3, 2, {"recall@1": 1 / 3}, {4: "shoes"}
    )
    assert re.findall(r'class="query">.*?<br>(\w)\.png', page) == ["c", "b", "a"]  # c never right: worst
    assert "3 queries: 2 fail (their first neighbour is of another class), all shown first" in page
    assert "Recall@1 0.3333" in page and "class shoes" in page
    summary = json.loads(results_json(queries, result, _index(), {}, []))["summary"]
    assert summary == {
        "queries": 3,
        "failures": 2,
        "successes": 1,
        "without_class": 0,
        "failures_worst_first": [2, 1],
    }


class _Index:
    meta = {"kind": "flat", "checkpoint": "model.ckpt"}

    def __len__(self) -> int:
        return 11


def _index():
    return _Index()


def test_the_run_s_retrieval_picture_draws_the_failures_first_and_says_how_many(monkeypatch, tmp_path):
    from dml.evaluation import pictures

    drawn = {}
    monkeypatch.setattr(
        pictures,
        "retrieval_grid",
        lambda queries, neighbours, correct, path, title: drawn.update(q=queries, t=title),
    )
    x = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7]]), dim=1
    )
    y = torch.tensor([0, 1, 1, 1, 0])  # 0, 1 and 4 fail; 1 and 4 are never right, 1 the surer
    pictures.split_retrievals(x, y, None, lambda i: i, torch.arange(5), tmp_path / "p.png", top_k=2, shown=3)
    assert drawn["q"] == [1, 4, 0]
    assert drawn["t"].startswith(
        "5 queries: 3 fail (their first neighbour is of another class), all shown first"
    )
    assert drawn["t"].endswith("Recall@1 0.4000, Recall@2 0.6000")  # 2 of 5 right first; 3 within 2
