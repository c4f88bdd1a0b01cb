"""The fast path's batched crop and resize (dml.data.resampling) against torch's antialiased interpolate,
one image at a time: the law the per-image path had, now in a few launches for the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dml.data.resampling as resampling
from dml.data.fast_path import EncodedBatch, crop_boxes
from dml.data.preprocessing import Preprocessing
from dml.data.resampling import resample

SHAPES = [(375, 500), (200, 90), (64, 64), (31, 47), (500, 333), (12, 300)]


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in SHAPES]


def one_by_one(batch, boxes, out, mode, flip=None):
    result = torch.stack(
        [
            F.interpolate(
                image[None, :, t : t + h, left : left + w].float(),
                size=out,
                mode=mode,
                antialias=True,
                align_corners=False,
            )[0]
            for image, (t, left, h, w) in zip(batch, boxes.tolist(), strict=True)
        ]
    )
    return result if flip is None else torch.where(flip[:, None, None, None], result.flip(-1), result)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("out", [(224, 224), (50, 80), (100, 30)])  # down- and upsampling, both axes
def test_each_box_is_resized_as_interpolate_resizes_it_alone(mode, out):
    batch = images()
    boxes = crop_boxes(torch.tensor(SHAPES), generator=torch.Generator().manual_seed(1))
    flip = torch.tensor([True, False, True, False, False, True])
    n = len(batch)
    got = resample(
        batch, boxes, torch.tensor([out] * n), torch.zeros(n, 2, dtype=torch.long), out, mode, flip
    )
    expected = one_by_one(batch, boxes, out, mode, flip)
    assert got.shape == (n, 3, *out)
    assert (got - expected).abs().max() < 0.02  # of 255: float32 sums in another order


def test_a_centre_crop_keeps_the_rows_and_columns_of_the_whole_resize():
    batch = images(2)
    whole = torch.tensor([(0, 0, h, w) for h, w in SHAPES])
    sizes = torch.tensor([(80, 90)] * len(SHAPES))
    offsets = torch.tensor([(5, 7)] * len(SHAPES))
    got = resample(batch, whole, sizes, offsets, (64, 70))
    expected = one_by_one(batch, whole, (80, 90), "bilinear")[:, :, 5:69, 7:77]
    assert (got - expected).abs().max() < 0.02


def test_a_batch_too_large_for_one_block_is_resized_in_several(monkeypatch):
    batch = images(3)
    boxes = torch.tensor([(0, 0, h, w) for h, w in SHAPES])
    args = (boxes, torch.tensor([(40, 40)] * len(SHAPES)), torch.zeros(len(SHAPES), 2, dtype=torch.long))
    whole = resample(batch, *args, (40, 40))
    monkeypatch.setattr(resampling, "CHUNK_BYTES", 3 * 400 * 500 * 4)
    assert resampling._chunks(SHAPES, 3) == [1, 3, 1, 1]
    assert torch.allclose(resample(batch, *args, (40, 40)), whole, atol=1e-3)  # other padding, other sums


def test_the_batch_transform_evaluates_and_augments_as_the_per_image_law():
    """Evaluation: torchvision's Resize sizes and CenterCrop offsets; training: crop_boxes then flips,
    drawn in that order from the generator."""
    batch = images(4)
    pre = Preprocessing((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize=72, center_crop=(64, 64), value_range=255)
    transform = pre.batch_transform()
    expected = []
    for image in batch:
        h, w = pre.resized_size(*image.shape[-2:])
        resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
        top, left = int(round((h - 64) / 2.0)), int(round((w - 64) / 2.0))
        expected.append(resized[:, top : top + 64, left : left + 64])
    got = transform.evaluate(batch)
    assert (got - torch.stack(expected).clamp(0, 255)).abs().max() < 0.02

    g = torch.Generator().manual_seed(5)
    boxes = crop_boxes(torch.tensor(SHAPES), scale=pre.crop_scale, generator=g)
    flip = torch.rand(len(batch), generator=g) < 0.5
    reference = one_by_one(batch, boxes, (64, 64), "bilinear", flip).clamp(0, 255)
    got = transform.augment(batch, torch.Generator().manual_seed(5))
    assert flip.any() and not flip.all()
    assert (got - reference).abs().max() < 0.02


def test_a_sorted_batch_is_not_parsed_again(monkeypatch):
    """An EncodedCollate batch says its encoded images are batch-decodable: the decoder trusts it."""
    from benchmarks.throughput import natural_jpeg

    import dml.data.decoding as decoding

    data = [
        torch.frombuffer(bytearray(natural_jpeg(seed, size=(60, 80))), dtype=torch.uint8) for seed in range(3)
    ]
    pre = Preprocessing((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize=(32, 32))
    expected = pre.batch_transform()(EncodedBatch(data, train=False), "cpu")
    monkeypatch.setattr(decoding, "batch_decodable", lambda data: pytest.fail("parsed again"))
    got = pre.batch_transform()(EncodedBatch(data, train=False, checked=True), "cpu")
    assert torch.equal(got, expected)
