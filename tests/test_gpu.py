"""GPU tier (`make test-all` or `pytest -m gpu`): skipped, visibly, without a CUDA device."""

import pytest
import torch
import torch.nn.functional as F
from benchmarks.losses import losses, total

from dml.evaluation import knn
from dml.losses import coding_rate
from dml.tasks import train

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def test_every_loss_on_gpu_matches_cpu_and_is_finite_under_bf16(cuda):
    x = F.normalize(torch.randn(40, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(20).repeat_interleave(2)
    cpu_losses, gpu_losses = losses(50, 64), losses(50, 64)
    for name, cpu_loss in cpu_losses.items():
        gpu_loss = gpu_losses[name].to(cuda)
        expected = total(cpu_loss, x, y)
        got = total(gpu_loss, x.to(cuda), y.to(cuda))
        if (
            "random" not in name and "distance" not in name and "margin_eps" not in name
        ):  # sampled on another RNG
            assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5), name
        xg = x.to(cuda).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            value = total(gpu_loss, xg @ torch.eye(64, device=cuda), y.to(cuda))
        value.backward()
        assert torch.isfinite(value), name
        grads = [xg.grad, *(p.grad for p in gpu_loss.parameters())]
        grads = [g for g in grads if g is not None]  # proxy-only losses: no xg.grad
        assert grads and all(torch.isfinite(g).all() for g in grads), name


def test_coding_rate_on_gpu_both_sides(cuda):
    z = torch.randn(300, 64, dtype=torch.float64)
    for rows in (z[:20], z):
        assert coding_rate(rows.to(cuda)).item() == pytest.approx(coding_rate(rows).item(), rel=1e-9)


def test_torch_knn_on_gpu_equals_cpu(cuda):
    x = F.normalize(torch.randn(2000, 32), dim=1)
    assert torch.equal(knn(x.to(cuda), k=10, backend="torch"), knn(x, k=10, backend="torch"))


def test_short_training_run_on_gpu_in_bf16(cuda, compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=synthetic_smoke",
            "trainer=gpu",
            "callbacks=no_progress",
            "trainer.enable_progress_bar=false",
        ]
    )
    metrics = train(cfg)
    assert 0 < metrics["test/recall@1"] <= 1


def test_retrieval_metrics_on_gpu_equal_cpu(cuda):
    from dml.evaluation import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 300, (9000,), generator=g)
    x = F.normalize(torch.randn(300, 64, generator=g)[y] + 2 * torch.randn(9000, 64, generator=g), dim=1)
    ks = (1, 10, 100)
    cpu = retrieval_metrics(x, y, ks=ks, nmi=False)
    gpu = retrieval_metrics(x.to(cuda), y, ks=ks, nmi=False)
    assert gpu == pytest.approx(cpu, abs=1e-4)
    q, gal = (
        retrieval_metrics(
            x[:3000].to(cuda),
            y[:3000],
            ks=ks,
            reference=x[3000:].to(cuda),
            reference_labels=y[3000:],
            nmi=False,
        ),
        retrieval_metrics(
            x[:3000], y[:3000], ks=ks, reference=x[3000:], reference_labels=y[3000:], nmi=False
        ),
    )
    assert q == pytest.approx(gal, abs=1e-4)


def test_fast_path_decodes_and_transforms_on_the_gpu_as_on_the_cpu(cuda):
    from benchmarks.throughput import natural_jpeg

    from dml.data.fast_path import EncodedBatch
    from dml.data.preprocessing import Preprocessing

    data = [torch.frombuffer(bytearray(natural_jpeg(seed)), dtype=torch.uint8) for seed in range(16)]
    imagenet = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize=256, center_crop=(224, 224))
    transform = imagenet.batch_transform()
    cpu = transform(EncodedBatch(data, train=False), "cpu")
    gpu = transform(EncodedBatch(data, train=False), cuda)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (16, 3, 224, 224)
    assert (gpu.cpu() - cpu).abs().mean() < 0.02  # nvJPEG and libjpeg round a little differently
    train_batch = transform(EncodedBatch(data, train=True), cuda)
    assert train_batch.shape == (16, 3, 224, 224) and torch.isfinite(train_batch).all()


def test_the_fast_path_s_byte_buffer_is_pinned_and_odd_jpegs_never_reach_nvjpeg(cuda, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from dml.data.decoding import fallbacks
    from dml.data.fast_path import EncodedCollate, EncodedFiles

    rng = np.random.default_rng(0)
    for i, options in enumerate([{}, {"progressive": True}, {}, {"subsampling": 0}]):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG", **options)
        (tmp_path / f"{i}.jpg").write_bytes(buffer.getvalue())
    files = EncodedFiles(tmp_path, [f"{i}.jpg" for i in range(4)])
    loader = torch.utils.data.DataLoader(
        [(files.load(i), 0, i) for i in range(4)],
        batch_size=4,
        num_workers=1,
        pin_memory=True,
        collate_fn=EncodedCollate(train=False),
    )
    batch, _, _ = next(iter(loader))
    assert batch.buffer.is_pinned() and batch.decoded_in_workers == 1
    before = fallbacks()
    from dml.data.decoding import decode

    images = decode(batch.data, cuda, batch.names)
    assert all(image.device.type == "cuda" for image in images) and fallbacks() == before


def test_the_decoder_never_writes_into_memory_queued_kernels_still_read(cuda):
    """torchvision issue 9606: nvJPEG's output may land in a block freed while queued kernels still read
    it. dml's decode, on its input stream, must leave every trial's kernel results intact, whether the
    reads were queued on the caller's stream or on the input stream itself (the probe's harness)."""
    from benchmarks.gpu_probe import hazard

    found = hazard(torch.device("cuda", torch.cuda.current_device()), trials=10)
    if not (found["block_reused_none"] or found["block_reused_input_stream_own"]):
        pytest.skip(f"the allocator never gave the decoder the freed block: nothing was provoked ({found})")
    assert found["corrupted_input_stream"] == found["corrupted_input_stream_own"] == 0, found
    assert found["block_reused_input_stream"] == 0, found  # another stream's block: never handed over
    assert found["corrupted_drain"] == 0, found
