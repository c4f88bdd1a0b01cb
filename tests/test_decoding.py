"""Which images the batched (nvJPEG) decoder gets, and what happens to the others: decoded in the loader
workers when their header says the batched decoder does not take them, retried alone and then decoded on
the CPU (logged once, counted) when it refuses them anyway."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dml.data.decoding as decoding
from dml.data.decoding import batch_decodable, decode, decode_one, fallbacks
from dml.data.fast_path import EncodedCollate, EncodedFiles

RNG = np.random.default_rng(0)


def encode(fmt: str = "JPEG", mode: str = "RGB", size=(40, 30), **options) -> torch.Tensor:
    pixels = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


KINDS = {
    "baseline 4:2:0": (encode(), True),
    "baseline 4:4:4": (encode(subsampling=0), True),
    "baseline 4:2:2": (encode(subsampling=1), True),
    "gray": (encode(mode="L"), True),
    "progressive": (encode(progressive=True), False),
    "CMYK": (encode(mode="CMYK"), False),
    "PNG": (encode("PNG"), False),
    "16-bit PNG": (encode("PNG", mode="I;16"), False),
    "damaged": (torch.tensor([0xFF, 0xD8, 0xFF, 0xC0, 0x00], dtype=torch.uint8), False),
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_header_says_which_images_the_batched_decoder_takes(kind):
    data, expected = KINDS[kind]
    assert batch_decodable(data) == expected


def test_the_workers_decode_what_the_batched_decoder_does_not_take(tmp_path):
    names = []
    for i, (kind, (data, _)) in enumerate(KINDS.items()):
        if kind != "damaged":
            names.append(f"{i}.img")
            (tmp_path / names[-1]).write_bytes(data.numpy().tobytes())
    files = EncodedFiles(tmp_path, names)
    items = [(files.load(i), 0, i) for i in range(len(names))]
    batch, _, _ = EncodedCollate(train=False)(items)
    assert batch.decoded_in_workers == 4  # progressive, CMYK, PNG, 16-bit PNG
    for item, (encoded, _, _) in zip(batch.data, items, strict=True):
        if batch_decodable(encoded.data):
            assert torch.equal(item, encoded.data)  # still encoded: the GPU decodes it
        else:
            assert torch.equal(item, decode_one(encoded.data, encoded.name))
    images = decode(batch.data, torch.device("cpu"), batch.names)
    assert all(image.shape[0] == 3 and image.dtype == torch.uint8 for image in images)


def test_the_collate_runs_in_forkserver_workers(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(encode(progressive=i % 2 == 1).numpy().tobytes())
    files = EncodedFiles(tmp_path, [f"{i}.jpg" for i in range(4)])
    dataset = [(files.load(i), 0, i) for i in range(4)]
    loader = DataLoader(
        dataset,
        batch_size=4,
        num_workers=1,
        collate_fn=EncodedCollate(train=True),
        multiprocessing_context="forkserver",  # Python 3.14's default: everything pickled
    )
    batch, labels, positions = next(iter(loader))
    assert len(batch) == 4 and batch.decoded_in_workers == 2 and positions.tolist() == [0, 1, 2, 3]


def test_a_jpeg_the_batched_decoder_refuses_is_retried_alone_then_decoded_on_the_cpu(monkeypatch, caplog):
    data = [encode() for _ in range(4)]
    refused = data[2]
    real = decoding.decode_jpeg
    calls = []

    def nvjpeg(images, **kwargs):  # refuses any batch holding `refused`, and `refused` alone
        calls.append(len(images) if isinstance(images, list) else 1)
        if any(x is refused for x in (images if isinstance(images, list) else [images])):
            raise RuntimeError("nvjpegDecodeBatched failed: unsupported")
        return real(images, **kwargs)

    monkeypatch.setattr(decoding, "decode_jpeg", nvjpeg)
    monkeypatch.setitem(decoding._fallbacks, "count", 0)
    names = [f"photo_{i}.jpg" for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="dml.data.decoding"):
        first = decode(data, torch.device("cpu"), names)
        again = decode(data, torch.device("cpu"), names)
    assert calls == [4, 1, 1, 1, 1] * 2  # the batch, then each image alone
    assert fallbacks() == 2  # the refused image, once per batch: counted
    warned = [r.getMessage() for r in caplog.records if "batched JPEG decoder refused" in r.getMessage()]
    assert len(warned) == 1 and "photo_2.jpg" in warned[0]  # logged once
    for images in (first, again):
        for image, d in zip(images, data, strict=True):
            assert torch.equal(image, decode_one(d, "x"))


def test_a_batch_of_bytes_and_pixels_keeps_each_as_it_was():
    from dml.data.fast_path import EncodedBatch

    pixels = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8).permute(0, 2, 1)  # not contiguous
    data = encode()
    batch = EncodedBatch([data, pixels], train=False)
    assert batch.decoded_in_workers == 1
    back = batch.data
    assert torch.equal(back[0], data) and torch.equal(back[1], pixels)
