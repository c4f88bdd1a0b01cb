from collections import Counter

import pytest
import torch

from dml.data import ClassBalancedBatchSampler, RandomBatchSampler
from dml.errors import UserError


def make_labels(sizes):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])


def batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_is_p_classes_by_k_samples():
    labels = make_labels([7, 12, 3, 9, 20, 5, 8])
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=3, seed=1)
    out = batches(sampler)
    assert len(out) == len(sampler) == len(labels) // 12
    for batch in out:
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4
        assert set(counts.values()) == {3}


def test_items_are_covered_before_repeating():
    labels = make_labels([6] * 5)
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=5, samples_per_class=6, num_batches=1)
    (batch,) = batches(sampler)
    assert sorted(batch) == list(range(30))  # each class gives its whole pool once


def test_reproducible_per_seed_and_new_each_epoch():
    labels = make_labels([10] * 8)
    a = ClassBalancedBatchSampler(labels, 4, 2, seed=3)
    b = ClassBalancedBatchSampler(labels, 4, 2, seed=3)
    c = ClassBalancedBatchSampler(labels, 4, 2, seed=4)
    assert batches(a, 0) == batches(b, 0)
    assert batches(a, 0) != batches(a, 1)
    assert batches(a, 0) != batches(c, 0)
    assert batches(a, 5) == batches(b, 5)


def test_ranks_get_disjoint_classes_that_make_up_the_global_batch():
    labels = make_labels([9] * 12)
    world = 3
    single = batches(ClassBalancedBatchSampler(labels, 6, 3, seed=7))
    per_rank = [
        batches(ClassBalancedBatchSampler(labels, 6, 3, seed=7, num_replicas=world, rank=r))
        for r in range(world)
    ]
    assert all(len(r) == len(single) for r in per_rank)
    for step, global_batch in enumerate(single):
        parts = [per_rank[r][step] for r in range(world)]
        classes = [set(labels[p].tolist()) for p in parts]
        assert all(len(c) == 2 for c in classes)
        assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
        assert sum(parts, []) == global_batch


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_default_image_batch_of_30_classes_by_4_splits_over_1_2_4_and_8_gpus(world):
    labels = make_labels([10] * 40)
    single = batches(ClassBalancedBatchSampler(labels, 30, 4, seed=5))
    per_rank = [
        batches(ClassBalancedBatchSampler(labels, 30, 4, seed=5, num_replicas=world, rank=r))
        for r in range(world)
    ]
    for step, global_batch in enumerate(single):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(len(p) == 120 // world for p in parts)
        assert sum(parts, []) == global_batch  # the ranks together hold the single-process batch


def test_small_classes_repeat_items_to_fill_k():
    labels = make_labels([2, 2, 2])
    (batch,) = batches(ClassBalancedBatchSampler(labels, 3, 4, num_batches=1))
    assert Counter(labels[batch].tolist()) == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize(
    ("p", "k", "world", "match"),
    [(5, 2, 1, "needs 5 classes"), (4, 2, 3, "cannot be split evenly"), (2, 0, 1, "at least 1")],
)
def test_impossible_settings_say_what_to_change(p, k, world, match):
    with pytest.raises(UserError, match=match):
        ClassBalancedBatchSampler(make_labels([4] * 4), p, k, num_replicas=world)


def test_random_batches_cover_the_epoch_once_and_ranks_split_each_batch():
    single = RandomBatchSampler(103, 10, seed=4)
    out = batches(single, epoch=2)
    assert len(out) == len(single) == 10  # the incomplete last batch is dropped
    flat = [i for b in out for i in b]
    assert len(set(flat)) == 100 and all(len(b) == 10 for b in out)
    assert out != batches(RandomBatchSampler(103, 10, seed=4), epoch=3)
    ranks = [batches(RandomBatchSampler(103, 10, seed=4, num_replicas=2, rank=r), epoch=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == out


def test_random_batches_reject_a_batch_that_does_not_split_or_fit():
    with pytest.raises(UserError, match="divisible by the number of devices"):
        RandomBatchSampler(100, 9, num_replicas=2)
    with pytest.raises(UserError, match="lower dataset.batch_size"):
        RandomBatchSampler(5, 10)


def test_datamodule_sampler_choice(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=synthetic_smoke", "dataset.sampler=random", "dataset.batch_size=25"])
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader.batch_sampler, RandomBatchSampler) and loader.batch_sampler.batch_size == 25
    with pytest.raises(Exception, match="dataset.sampler='balanced' is not one of class_balanced, random"):
        instantiate(compose_cfg(["experiment=synthetic_smoke", "dataset.sampler=balanced"]).dataset)
