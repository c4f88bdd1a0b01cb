"""Image files of every bit depth and format read alike on every path (the datasets, the fast path, the
embedder), and an image that no decoder reads named by its file (cases 2 and 7 of issue 27)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import CUBDataModule
from dml.data.datasets.benchmark import ImageFiles
from dml.data.fast_path import EncodedBatch, decode
from dml.data.images import open_image, to_8bit
from dml.errors import UserError
from tests.benchmark_fixtures import make_cub


def gradient(height: int = 40, width: int = 48) -> np.ndarray:
    """An 8-bit grayscale picture with every level from dark to light."""
    return (np.add.outer(np.arange(height), np.arange(width)) * 255 // (height + width - 2)).astype(np.uint8)


@pytest.fixture
def gray16(tmp_path):
    """The same picture as a 16-bit grayscale PNG and as its 8-bit copy."""
    eight = gradient()
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 8-bit v -> 16-bit v*257
    Image.fromarray(eight).save(tmp_path / "eight.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    return tmp_path / "sixteen.png", tmp_path / "eight.png"


def test_a_16_bit_png_reads_as_its_8_bit_copy_on_the_classic_path(gray16):
    sixteen, eight = gray16
    for mode in ("RGB", "L"):
        np.testing.assert_array_equal(
            np.asarray(open_image(sixteen, mode)), np.asarray(open_image(eight, mode))
        )
    files = ImageFiles(sixteen.parent, [sixteen.name, eight.name])
    np.testing.assert_array_equal(np.asarray(files.load(0)), np.asarray(files.load(1)))
    assert np.asarray(files.load(0)).max() == 255 and np.asarray(files.load(0)).min() == 0, "not all white"


def test_a_16_bit_png_reads_as_its_8_bit_copy_on_the_fast_path(gray16):
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in gray16]
    sixteen, eight = decode(data, torch.device("cpu"))
    assert sixteen.dtype == torch.uint8
    torch.testing.assert_close(sixteen, eight, rtol=0, atol=0)


def test_a_16_bit_png_embeds_as_its_8_bit_copy(embedder, gray16):
    embeddings = embedder.embed_files(list(gray16), progress=False)
    assert not embeddings.skipped
    cosine = (embeddings.vectors[0] * embeddings.vectors[1]).sum()
    assert cosine > 0.9999


def test_pixels_with_no_8_bit_meaning_are_refused_by_name(tmp_path, embedder):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="floating-point"):
        to_8bit(Image.open(tmp_path / "float.tif"))
    files = ImageFiles(tmp_path, ["float.tif"])
    with pytest.raises(
        UserError, match=f"cannot read image {tmp_path / 'float.tif'}: its pixels are floating-point"
    ):
        files.load(0)
    with pytest.raises(UserError, match="none of the 1 images could be read: .*float.tif .*floating-point"):
        embedder.embed_files([tmp_path / "float.tif"], progress=False)


def test_formats_torchvision_does_not_decode_take_pil_on_the_fast_path(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for fmt in ("BMP", "TIFF"):
        path = tmp_path / f"image.{fmt.lower()}"
        Image.fromarray(rgb).save(path, fmt)
        (decoded,) = decode(
            [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], torch.device("cpu")
        )
        np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), rgb)


def test_an_image_no_decoder_reads_is_named_on_the_fast_path():
    broken = torch.frombuffer(bytearray(b"\xff\xd8garbage"), dtype=torch.uint8)
    batch = EncodedBatch([broken], train=False, names=["/data/cub/images/broken.jpg"])
    with pytest.raises(UserError, match="cannot read image /data/cub/images/broken.jpg: .*replace the file"):
        decode(batch.data, torch.device("cpu"), batch.names)


def test_an_image_damaged_after_preparation_is_named_on_the_fast_path(tmp_path):
    make_cub(tmp_path / "cub")
    small = dict(
        image_size=8, resize_size=10, batch_size=4, samples_per_class=2, eval_batch_size=4, download=False
    )
    dm = CUBDataModule(str(tmp_path / "cub"), num_train_classes=3, pipeline="fast", **small)
    dm.prepare_data()
    dm.setup("test")
    victim = tmp_path / "cub" / dm.splits["test"].raw_source.paths[0]
    for damage in (b"\xff\xd8 truncated", b""):
        victim.write_bytes(damage)
        # named where it is decoded: in the loader (what the GPU's batch decoder would not take) or after
        with pytest.raises(UserError, match=f"cannot read image {victim}: .*prepare the dataset again"):
            dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
