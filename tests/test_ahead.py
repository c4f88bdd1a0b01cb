"""Decoding ahead (dml.data.ahead): the next training batches made by a thread, in order, with the same
augmentation draws as made in the training loop; errors reach the loop; an epoch left early stops it."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import DataLoader

from dml.data.ahead import DecodeAhead, Prefetched
from dml.data.fast_path import EncodedCollate, EncodedTensors
from dml.data.preprocessing import Preprocessing
from dml.data.samplers import RandomBatchSampler
from dml.errors import UserError
from dml.tasks import train
from tests.conftest import FAST_RUN, compose_config

PRE = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), resize=(16, 16), center_crop=(12, 12))


def loader(count: int = 24, batch: int = 4) -> DataLoader:
    images = torch.randint(
        0, 256, (count, 3, 20, 18), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    source = EncodedTensors(images)
    items = [(source.load(i), i % 6, i) for i in range(count)]
    return DataLoader(
        items, batch_sampler=RandomBatchSampler(count, batch, seed=1), collate_fn=EncodedCollate(train=True)
    )


def test_batches_come_in_order_with_the_draws_the_loop_would_make():
    transform = PRE.batch_transform()
    expected_draws, made_draws = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    expected = [(transform(b, "cpu", expected_draws), labels) for b, labels, _ in loader()]
    ahead = DecodeAhead(loader(), lambda b: transform(b, "cpu", made_draws), "cpu")
    got = [(p.images_on_current_stream(), labels) for p, labels, _ in ahead]
    assert len(ahead) == len(got) == len(expected) == 6
    for (image, labels), (want, want_labels) in zip(got, expected, strict=True):
        assert torch.equal(image, want) and torch.equal(labels, want_labels)
    assert isinstance(next(iter(ahead))[0], Prefetched)


def test_the_sampler_s_epoch_reaches_the_wrapped_loader():
    ahead = DecodeAhead(loader(), lambda b: b.buffer, "cpu")
    assert ahead.batch_sampler is ahead.loader.batch_sampler and ahead.dataset is ahead.loader.dataset
    first = [positions.tolist() for _, _, positions in ahead]
    ahead.batch_sampler.set_epoch(1)
    assert [positions.tolist() for _, _, positions in ahead] != first


def test_an_error_in_the_thread_reaches_the_loop():
    def broken(batch):
        raise UserError("image 3 of the batch cannot be read")

    with pytest.raises(UserError, match="image 3 of the batch"):
        list(DecodeAhead(loader(), broken, "cpu"))


def test_an_epoch_left_early_stops_its_thread():
    ahead = DecodeAhead(loader(count=80), lambda b: b.buffer, "cpu", depth=1)
    for i, _ in enumerate(ahead):
        if i == 1:
            break
    assert not any(t.name == "dml-decode-ahead" for t in threading.enumerate())


def test_training_with_decoding_ahead_equals_training_without(tmp_path):
    """The fast path through the thread or in the loop: the same batches, so the same run."""
    metrics = {}
    for ahead in ("true", "false"):
        overrides = [
            *FAST_RUN,
            "dataset.pipeline=fast",
            f"dataset.decode_ahead={ahead}",
            "seed=2",
            "trainer.max_epochs=2",
        ]
        metrics[ahead] = train(compose_config(overrides, tmp_path / ahead))
    assert metrics["true"]["train/loss"] == pytest.approx(metrics["false"]["train/loss"], rel=1e-5)
    assert metrics["true"]["test/recall@1"] == pytest.approx(metrics["false"]["test/recall@1"], abs=1e-6)
