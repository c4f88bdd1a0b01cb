"""The fast input path (dml.data.fast_path): the classic path's augmentation law, sizes, value ranges and
statistics, on the CPU (CI has no GPU); the datamodules that offer it; the speed switches."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from benchmarks.throughput import natural_jpeg
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T

from dml.builders import build_module
from dml.data import CUBDataModule, MNISTDataModule, SyntheticDataModule
from dml.data.fast_path import EncodedBatch, crop_boxes, decode
from dml.data.preprocessing import Preprocessing
from dml.errors import UserError
from dml.study import embed
from dml.tasks import train
from tests.benchmark_fixtures import make_cub
from tests.conftest import FAST_RUN, compose_config, run_entry

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Stub:
    """A trainer as the datamodule sees it: device, epoch, world size and rank."""

    def __init__(self, device: str = "cpu", epoch: int = 0, world: int = 1, rank: int = 0):
        self.strategy = type("S", (), {"root_device": torch.device(device)})()
        self.current_epoch, self.world_size, self.global_rank = epoch, world, rank


def jpegs(count: int, size=(500, 375)) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(natural_jpeg(seed, size)), dtype=torch.uint8) for seed in range(count)]


def torchvision_boxes(height: int, width: int, count: int) -> np.ndarray:
    image = torch.empty(3, height, width)
    return np.array(
        [T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(count)]
    )


def both_boxes(size: tuple[int, int], count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` crop boxes for an image of ``size`` from ours and from torchvision, seeded."""
    torch.manual_seed(0)
    return crop_boxes(torch.tensor([size] * count)).numpy(), torchvision_boxes(*size, count)


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (64, 64)])
def test_crop_boxes_follow_torchvision_random_resized_crop(size):
    height, width = size
    ours, theirs = both_boxes(size, 20_000)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    for name, f in {
        "area fraction": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "aspect ratio": lambda b: b[:, 3] / b[:, 2],
        "top": lambda b: b[:, 0] / height,
        "left": lambda b: b[:, 1] / width,
    }.items():
        result = ks_2samp(f(ours), f(theirs))
        assert result.statistic < 0.02, f"{name}: KS {result.statistic:.3f} (p {result.pvalue:.2g})"


@pytest.mark.parametrize("size", [(40, 400), (400, 40), (30, 30)])
def test_crop_boxes_fall_back_to_torchvision_s_centre_crop(size):
    """Images so elongated that no draw fits (a tenth of the tries at most), and tiny ones."""
    height, width = size
    ours, theirs = both_boxes(size, 2000)
    fallback = lambda b: {tuple(r) for r in b if (r[2] == height or r[3] == width)}  # noqa: E731
    # the fall-back crop is deterministic: both give the same one, and about as often
    centre = fallback(ours) & fallback(theirs)
    assert centre
    share = lambda b: np.mean([tuple(r) in centre for r in b])  # noqa: E731
    assert abs(share(ours) - share(theirs)) < 0.05


def test_jpegs_decode_in_one_batch_and_others_one_by_one():
    png = io.BytesIO()
    Image.new("L", (20, 10), 128).save(png, "PNG")
    data = [*jpegs(2, (50, 40)), torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8)]
    images = decode(data, torch.device("cpu"))
    assert [tuple(i.shape) for i in images] == [(3, 40, 50), (3, 40, 50), (3, 10, 20)]
    assert all(i.dtype == torch.uint8 for i in images) and int(images[2].float().mean()) == 128


def batched(crop: int, resize: int, mean, std, bgr_255: bool = False):
    """The fast path's transform of a shorter-side resize and a square centre crop."""
    order = {"channel_order": "BGR", "value_range": 255} if bgr_255 else {}
    return Preprocessing(mean, std, resize=resize, center_crop=(crop, crop), **order).batch_transform()


def classic(stage: str):
    steps = (
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        if stage == "train"
        else [T.Resize(256), T.CenterCrop(224)]
    )
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


def test_evaluation_batches_match_the_classic_transform():
    data = jpegs(8)
    fast = batched(224, 256, MEAN, STD)(EncodedBatch(data, train=False), "cpu")
    reference = torch.stack(
        [classic("eval")(Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB")) for d in data]
    )
    assert fast.shape == reference.shape == (8, 3, 224, 224) and fast.dtype == torch.float32
    # PIL and torch resample a little differently (and PIL rounds to uint8): a small fraction of a level
    assert (fast - reference).abs().mean() < 0.02
    assert (fast - reference).abs().max() < 0.5


def test_training_batches_have_the_classic_path_s_size_range_and_statistics():
    torch.manual_seed(0)
    data = jpegs(48)
    transform = batched(224, 256, MEAN, STD)
    fast = torch.cat([transform(EncodedBatch(data, train=True), "cpu") for _ in range(4)])
    pil = [Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB") for d in data]
    reference = torch.stack([classic("train")(image) for _ in range(4) for image in pil])
    assert fast.shape == reference.shape == (192, 3, 224, 224)
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = fast.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-4).all() and (
        per_channel.max(1).values <= high + 1e-4
    ).all()
    # the same content through the same law: channel means and spreads agree within sampling noise
    assert torch.allclose(fast.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(fast.std((0, 2, 3)), reference.std((0, 2, 3)), rtol=0.05)
    # flips: about half of the batch, as RandomHorizontalFlip
    transform.augment_crops = False
    same = transform(EncodedBatch(data[:1], train=False), "cpu")
    torch.manual_seed(1)
    batch = transform(EncodedBatch(data[:1] * 400, train=True), "cpu")
    unflipped = (batch - same).abs().amax((1, 2, 3)) < 1e-4
    flipped = (batch - same.flip(-1)).abs().amax((1, 2, 3)) < 1e-4
    assert (unflipped ^ flipped).all() and abs(flipped.float().mean() - 0.5) < 0.08


def test_bgr_255_batches_are_caffe_style():
    data = jpegs(2, (64, 64))
    rgb = batched(64, 64, (0, 0, 0), (1, 1, 1))(EncodedBatch(data, train=False), "cpu")
    bgr = batched(64, 64, (0, 0, 0), (1, 1, 1), bgr_255=True)(EncodedBatch(data, train=False), "cpu")
    assert torch.allclose(bgr, rgb.flip(1) * 255, atol=1e-3)


def test_fast_path_datamodule_gives_decoded_batches_and_raw_images():
    dm = SyntheticDataModule(pipeline="fast", batch_size=24, samples_per_class=4, num_train_classes=6)
    dm.setup("fit")
    assert dm.fast
    encoded, labels, positions = next(iter(dm.train_dataloader()))
    assert isinstance(encoded, EncodedBatch) and encoded.train and len(encoded) == 24
    images, labels2, _ = dm.on_after_batch_transfer((encoded, labels, positions), 0)
    assert images.shape == (24, 3, 32, 32) and labels2 is labels
    classic_dm = SyntheticDataModule(
        pipeline="classic", batch_size=24, samples_per_class=4, num_train_classes=6
    )
    classic_dm.setup("fit")
    assert not classic_dm.fast
    reference = torch.stack([classic_dm.splits["test"][i][0] for i in range(8)])
    test = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)[0][:8]
    # JPEG (quality 95) smooths the synthetic images' pixel noise; their content stays
    assert (test.mean((1, 2, 3)) - reference.mean((1, 2, 3))).abs().max() < 0.05
    assert torch.corrcoef(torch.stack([test.flatten(), reference.flatten()]))[0, 1] > 0.8
    assert torch.equal(dm.splits["test"].raw_image(0), classic_dm.splits["test"].raw_image(0))


def test_pipeline_auto_is_classic_without_a_gpu_and_fast_is_refused_where_missing():
    dm = SyntheticDataModule(pipeline="auto", batch_size=24, samples_per_class=4, num_train_classes=6)
    assert not dm.fast
    with pytest.raises(UserError, match="dataset.pipeline=fast: mnist has no fast input path"):
        MNISTDataModule(pipeline="fast")
    with pytest.raises(UserError, match="dataset.pipeline='gpu' is not one of auto, classic, fast"):
        SyntheticDataModule(pipeline="gpu")


def test_fast_path_trains_to_the_classic_path_s_recall(tmp_path):
    """The same short synthetic run through either path: test Recall@1 within noise (JPEG at quality 95
    is the only difference: the synthetic dataset has no augmentation)."""
    recall = {}
    for pipeline in ("classic", "fast"):
        overrides = [*FAST_RUN, f"dataset.pipeline={pipeline}", "seed=1", "trainer.max_epochs=3"]
        cfg = compose_config(overrides, tmp_path / pipeline)
        recall[pipeline] = train(cfg)["test/recall@1"]
    assert recall["classic"] > 0.5 and abs(recall["fast"] - recall["classic"]) < 0.1, recall
    # a fast-path checkpoint embeds outside Lightning too (dml.study.embed decodes the bytes in batches)
    embedded = embed(tmp_path / "fast" / "run" / "checkpoints" / "last.ckpt", "test")
    assert embedded.embeddings.shape == (180, 64) and embedded.scores()["recall@1"] > 0.5


def test_channels_last_switch_converts_the_backbone_and_its_inputs(compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=synthetic_smoke",
            "trainer.accelerator=cpu",
            "model.channels_last=true",
            "model.compile=false",
        ]
    )
    module = build_module(cfg)

    module._trainer = _Stub("cpu")
    module.setup("fit")
    conv = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    assert module(x).shape == (2, 64)
    with pytest.raises(UserError, match="model.compile='yes' must be true, false or auto"):
        build_module(compose_cfg(["experiment=synthetic_smoke", "model.compile=yes"]))


def test_speed_switches_default_to_auto_and_stay_off_on_cpu(compose_cfg):
    cfg = compose_cfg(["experiment=synthetic_smoke", "trainer.accelerator=cpu"])
    assert (
        cfg.model.channels_last == "auto" and cfg.model.compile == "auto" and cfg.dataset.pipeline == "auto"
    )
    module = build_module(cfg)

    module._trainer = _Stub("cpu")
    module.setup("fit")
    assert not module._channels_last and not hasattr(module.backbone, "_compiled_by_dml")
    assert math.isfinite(module(torch.randn(2, 3, 32, 32)).sum().item())


def test_resized_cache_is_written_once_beside_the_dataset_and_read_from(tmp_path):
    make_cub(tmp_path / "cub", per_class=4)  # 12 x 12 images
    small = dict(
        image_size=8, resize_size=10, batch_size=4, samples_per_class=2, num_train_classes=3, download=False
    )
    dm = CUBDataModule(root=str(tmp_path / "cub"), resized_cache=True, pipeline="fast", **small)
    dm.prepare_data()
    copy = tmp_path / "cub" / ".dml_resized_10"
    files = sorted(copy.rglob("*.jpg"))
    assert len(files) == 24 and json.loads((copy / "complete.json").read_text())["images"] == 24
    assert all(min(Image.open(f).size) == 10 for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    dm.setup("fit")
    assert dm.splits["train"].source.root == copy and dm.splits["train"].raw_source.root == copy
    assert [f.stat().st_mtime_ns for f in files] == stamps, "a finished copy is not written again"
    images = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0]
    assert images.shape == (4, 3, 8, 8)
    # a copy stopped half-way goes on where it stopped
    (copy / "complete.json").unlink()
    files[0].unlink()
    CUBDataModule(root=str(tmp_path / "cub"), resized_cache=True, **small).prepare_data()
    assert files[0].is_file() and [f.stat().st_mtime_ns for f in files[1:]] == stamps[1:]


@pytest.mark.slow  # two short Lightning fits and a dataset of 400 JPEGs
def test_throughput_benchmark_runs_and_reports_every_measure(tmp_path):
    args = "--device cpu --backbone test_resnet --batch 8 --size 32 --workers 0 --steps 2 --warmup 1"
    args += f" --per-class 2 --modes fp32 --e2e-mode fp32 --data {tmp_path}"
    proc = run_entry("benchmarks/throughput.py", args.split())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(
        r"^device CPU \(\d+ cores\); torch \S+; test_resnet at 32 px, batch 8; 0 loader workers", out, re.M
    )
    assert re.search(r"^\(a\) .*\n    fp32 +\d+$", out, re.M), out
    for path in ("classic", "fast"):
        assert re.search(rf"^    {path} +\d+ +[\d.]+%$", out, re.M), out
        assert re.search(rf"^    {path} +\d+$", out, re.M), out
    assert len(list((tmp_path / "cub" / "CUB_200_2011" / "images").rglob("*.jpg"))) == 400


def test_encoded_batches_travel_as_one_buffer():
    data = jpegs(3, (40, 30))
    batch = EncodedBatch(data, train=True)
    assert batch.buffer.ndim == 1 and len(batch.buffer) == sum(len(d) for d in data) and len(batch) == 3
    assert all(torch.equal(a, b) for a, b in zip(batch.data, data, strict=True))


def test_augmentation_draws_per_rank_and_epoch_and_repeats_on_resume():
    dm = SyntheticDataModule(pipeline="fast", batch_size=24, samples_per_class=4, num_train_classes=6, seed=3)

    def draws(**trainer) -> torch.Tensor:
        dm.trainer = _Stub(**trainer)
        return torch.rand(5, generator=dm.augmentation_generator())

    first = draws(world=2, rank=0)
    assert not torch.equal(first, draws(world=2, rank=1)), "each process its own crops and flips"
    assert not torch.equal(first, draws(world=2, rank=0, epoch=1))
    assert torch.equal(first, draws(world=2, rank=0)), "an epoch resumed draws what it drew"


def test_pipeline_auto_takes_the_fast_path_on_a_gpu_for_image_files_only(tmp_path):
    make_cub(tmp_path / "cub", per_class=4)
    cub = CUBDataModule(root=str(tmp_path / "cub"), image_size=8, resize_size=10, num_train_classes=3)
    synthetic = SyntheticDataModule(batch_size=24, samples_per_class=4, num_train_classes=6, pipeline="auto")
    for dm, on_gpu in ((cub, True), (synthetic, False)):
        dm.pipeline = "auto"
        dm.trainer = _Stub("cpu")
        assert not dm.fast
        dm.trainer = _Stub("cuda")
        assert dm.fast == on_gpu


def test_a_centre_crop_larger_than_the_resize_is_refused():
    with pytest.raises(UserError, match="dataset.resize_size=200 is smaller than dataset.image_size=224"):
        batched(224, 200, MEAN, STD)
