"""``preprocessing.json`` is enough to use an exported model: the preprocessing re-implemented from it with
PIL and numpy alone (no dml) feeds the ONNX model images that give the checkpoint's own embeddings, for an
image benchmark (resize and centre crop, RGB or Caffe-style BGR 0-255) and for MNIST (gray, 28 x 28)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dml.config import compose
from dml.inference import Embedder, export
from dml.tasks import train
from tests.benchmark_fixtures import make_cub, tiny_cub
from tests.conftest import FAST_RUN

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def preprocess(path: Path, pre: dict) -> np.ndarray:
    """One image file as the exported model takes it, from ``preprocessing.json``'s steps and values only."""
    with Image.open(path) as image:
        image = image.convert(pre["color"])
    width, height = image.size
    if isinstance(pre["resize"], int):
        short, long = sorted((height, width))
        other = int(pre["resize"] * long / short)
        height, width = (pre["resize"], other) if height <= width else (other, pre["resize"])
    else:
        height, width = pre["resize"]
    image = image.resize((width, height), RESAMPLING[pre["interpolation"]])
    if pre["center_crop"]:
        crop_h, crop_w = pre["center_crop"]
        top, left = int(round((height - crop_h) / 2)), int(round((width - crop_w) / 2))
        image = image.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(image, dtype=np.float32)
    x = x[:, :, None] if x.ndim == 2 else x
    if pre["value_range"] == [0, 1]:
        x = x / 255
    if pre["channel_order"] == "BGR":
        x = x[:, :, ::-1]
    x = np.repeat(x, pre["channels"], axis=2) if x.shape[2] == 1 else x
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def onnx_embeddings(folder: Path, paths: list[Path]) -> np.ndarray:
    import onnxruntime

    pre = json.loads((folder / "preprocessing.json").read_text())
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    (out,) = session.run(None, {"images": np.stack([preprocess(p, pre) for p in paths])})
    return out


def trained(base: Path, overrides: list[str]) -> Embedder:
    train(compose([*overrides, "trainer.max_epochs=1", *FAST_RUN[1:], "~logger"], output_dir=base / "run"))
    return Embedder.from_checkpoint(base / "run" / "checkpoints" / "last.ckpt", device="cpu")


@pytest.mark.parametrize(
    "order",
    [
        [],
        [
            "dataset.bgr_255=true",
            "dataset.mean=[104,117,128]",
            "dataset.std=[58,57,57]",
            "dataset.interpolation=bicubic",
        ],
    ],
    ids=["rgb", "bgr_255_bicubic"],
)
def test_an_image_benchmark_export_is_reproduced_from_its_json(tmp_path, order):
    # images of many sizes, wider and taller ones: the shorter-side resize and the centre crop both act
    make_cub(tmp_path / "data" / "cub", size=lambda seed: (30 + 7 * (seed % 4), 52 - 5 * (seed % 5)))
    embedder = trained(
        tmp_path, [*tiny_cub(tmp_path / "data"), "backbone=timm_test", "dataset.num_workers=0", *order]
    )
    folder = tmp_path / "export"
    export(embedder, folder, formats=["onnx"])
    pre = json.loads((folder / "preprocessing.json").read_text())
    assert (pre["resize"], pre["center_crop"]) == (36, [32, 32])
    assert pre["channel_order"] == ("BGR" if order else "RGB")

    test = embedder.require_dataset("the test").splits["test"]
    paths = [test.source.root / p for p in test.source.paths]  # the files the evaluation read
    evaluated = embedder.embed_split("test", progress=False).vectors.numpy()
    np.testing.assert_allclose(onnx_embeddings(folder, paths), evaluated, atol=1e-4)
    files = embedder.embed_files(paths, progress=False).vectors.numpy()
    np.testing.assert_allclose(files, evaluated, atol=1e-5)  # embed.py sees what evaluate.py scored


def test_an_mnist_export_is_reproduced_from_its_json(tmp_path):
    embedder = trained(
        tmp_path,
        [
            "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2",
            "test=false",
            "callbacks=no_progress",
        ],
    )
    folder = tmp_path / "export"
    export(embedder, folder, formats=["onnx"])
    pre = json.loads((folder / "preprocessing.json").read_text())
    assert (pre["color"], pre["resize"], pre["center_crop"], pre["channels"]) == ("L", [28, 28], None, 1)

    test = embedder.require_dataset("the test").splits["test"]
    paths = []
    for i in range(24):  # the split's images, as files
        gray = (test.raw_image(i)[0].numpy() * 255).round().astype(np.uint8)
        paths.append(tmp_path / f"digit_{i}.png")
        Image.fromarray(gray, "L").save(paths[-1])
    evaluated = embedder.embed_split("test", progress=False).vectors[:24].numpy()
    np.testing.assert_allclose(onnx_embeddings(folder, paths), evaluated, atol=1e-4)
    # a colour photo of another size: converted to gray and resized, by the embedder as by the JSON
    colour = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 33, 3), dtype=np.uint8), "RGB").save(colour)
    np.testing.assert_allclose(
        onnx_embeddings(folder, [colour]),
        embedder.embed_files([colour], progress=False).vectors.numpy(),
        atol=1e-4,
    )
