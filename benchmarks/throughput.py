"""Training and evaluation throughput: the step ceiling against the classic and the fast input paths.

    python benchmarks/throughput.py [--device cuda] [--backbone resnet50] [--batch 180] [--workers 16]
        [--steps 30] [--per-class 30] [--data DIR] [--modes fp32 bf16-cl bf16-cl-compile]
        [--e2e-mode bf16-cl-compile]

Builds (once, under --data) a synthetic JPEG dataset in the CUB-200-2011 layout: 500 x 375 images of
natural-image statistics (colour noise with a power-law spectrum and hard-edged shapes, JPEG quality
90, about 58 KB each; CUB's photos average about 95 KB). Then prints, with the device, torch version and worker count:

(a) the step ceiling: the package's module (backbone, 512-d head, Proxy-Anchor) trained on a batch
    already on the device, in each of --modes (fp32; bf16 autocast + channels_last; + torch.compile);
(b) end-to-end training images/s through the real CUBDataModule and DMLModule under Lightning, for the
    classic path (PIL decode + RandomResizedCrop in the workers) and the fast path (bytes from the
    workers, batched decode and augmentation on the device), in --e2e-mode, each as a share of (a) in
    that mode;
(c) evaluation: embedding images/s of the test split through each path.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

from dml.builders import build_data_and_module, build_module
from dml.config import compose
from dml.data.fast_path import EncodedBatch

MODES = ("fp32", "bf16-cl", "bf16-cl-compile")


def natural_jpeg(seed: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """A JPEG of ``size`` (width, height) with natural-image statistics: colour noise with an f^-1.4
    amplitude spectrum (smooth regions, texture at every scale) and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    width, height = size
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1.0 / max(size)) ** -1.4
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        channels.append((field - field.mean()) / (field.std() + 1e-8))
    mix = rng.normal(0, 0.5, (3, 3)) + np.eye(3)  # correlated channels, as in photos
    image = np.tensordot(mix, np.stack(channels), 1)
    image = np.clip(128 + 40 * image, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    picture = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = (
            x0 + rng.integers(width // 20, width // 2 + 1),
            y0 + rng.integers(height // 20, height // 2 + 1),
        )
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_cub_layout(root: Path, per_class: int = 30, unique: int = 200, classes: int = 200) -> Path:
    """CUB_200_2011/ (images/, images.txt, image_class_labels.txt, classes.txt) under ``root``, as the
    official archive extracts; ``unique`` distinct images, reused in turn. Kept if already there."""
    folder = root / "CUB_200_2011"
    if (folder / "images.txt").is_file():
        return root
    pictures = [natural_jpeg(seed) for seed in range(min(unique, classes * per_class))]
    images, labels, names = [], [], []
    for c in range(1, classes + 1):
        names.append(f"{c} {c:03d}.Class_{c}")
        for j in range(per_class):
            index = len(images) + 1
            rel = f"{c:03d}.Class_{c}/Class_{c}_{j:04d}.jpg"
            (folder / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / "images" / rel).write_bytes(pictures[index % len(pictures)])
            images.append(f"{index} {rel}")
            labels.append(f"{index} {c}")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    (folder / "images.txt").write_text("\n".join(images) + "\n")  # last: marks the layout complete
    return root


def config(args: argparse.Namespace, mode: str, pipeline: str):
    return compose(
        [
            "experiment=proxy_anchor_cub_r50",
            f"backbone.name={args.backbone}",
            "backbone.pretrained=false",
            f"paths.data_dir={args.data}",
            "dataset.download=false",
            "dataset.num_train_classes=100",
            f"dataset.batch_size={args.batch}",
            f"dataset.eval_batch_size={args.batch}",
            f"dataset.num_workers={args.workers}",
            f"dataset.pin_memory={args.device == 'cuda'}",
            f"dataset.pipeline={pipeline}",
            f"dataset.image_size={args.size}",
            f"dataset.resize_size={round(args.size / 0.875)}",
            "model.warmup_epochs=0",
            f"model.channels_last={'cl' in mode}",
            f"model.compile={'compile' in mode}",
            f"trainer.precision={'bf16-mixed' if 'bf16' in mode else '32-true'}",
        ]
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ceiling(args: argparse.Namespace, mode: str) -> float:
    """Training images/s of the module on a batch resident on the device (no input pipeline)."""
    torch.manual_seed(0)
    module = build_module(config(args, mode, "classic")).to(args.device)
    module.train()
    if "cl" in mode:
        module.backbone.to(memory_format=torch.channels_last)
    if "compile" in mode:
        module.backbone.compile()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    if "cl" in mode:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (args.batch,), device=args.device)
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32

    def step() -> None:
        with torch.autocast(args.device, dtype=dtype, enabled="bf16" in mode):
            loss = module.loss(module(images), labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    return args.steps * args.batch / (time.perf_counter() - start)


class Clock(L.Callback):
    """Times the training batches after the first ``warmup`` (compilation, the loader's prefetch buffer
    filling and draining), synchronising the device only at the two ends of the window."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.seen, self.start, self.end = warmup, device, 0, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.warmup or self.seen == trainer.max_steps:
            sync(self.device)
            if self.seen == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    @property
    def timed(self) -> int:
        return self.seen - self.warmup


def loader_warmup(args: argparse.Namespace) -> int:
    """Batches to run before timing: the step's own warm-up plus what the workers prefetch (2 each)."""
    return args.warmup + 2 * args.workers


def end_to_end(args: argparse.Namespace, mode: str, pipeline: str) -> float:
    """Training images/s through Lightning, the real datamodule and module, on the ``pipeline`` path."""
    torch.manual_seed(0)
    datamodule, module = build_data_and_module(config(args, mode, pipeline))
    clock = Clock(loader_warmup(args), args.device)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if "bf16" in mode else "32-true",
        max_epochs=-1,
        max_steps=clock.warmup + args.steps,  # over as many epochs as that takes
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule)
    return clock.timed * args.batch / (clock.end - clock.start)


@torch.no_grad()
def evaluation(args: argparse.Namespace, mode: str, pipeline: str) -> float:
    """Embedding images/s of the test split on the ``pipeline`` path (passes repeated as needed)."""
    datamodule, module = build_data_and_module(config(args, mode, pipeline))
    datamodule.setup("test")
    module.to(args.device).eval()
    if "cl" in mode:
        module.backbone.to(memory_format=torch.channels_last)
        module._channels_last = True
    if "compile" in mode:
        module.backbone.compile()
    loader = datamodule.test_dataloader()
    warmup, count, start = loader_warmup(args), 0, None
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled="bf16" in mode):
        while count < args.steps * args.batch:
            for images, labels, positions in loader:
                if isinstance(images, EncodedBatch):
                    images = datamodule.on_after_batch_transfer(
                        (images, labels.to(args.device), positions), 0
                    )[0]
                else:
                    images = images.to(args.device, non_blocking=True)
                module(images)
                warmup -= 1
                if warmup == 0:
                    sync(args.device)
                    start = time.perf_counter()
                elif warmup < 0:
                    count += len(labels)
                if count >= args.steps * args.batch:
                    break
    sync(args.device)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=100, help="timed batches (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches, plus 2 per loader worker")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dml-throughput")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--e2e-mode", choices=MODES, default=MODES[-1])
    args = parser.parse_args()
    make_cub_layout(args.data / "cub", args.per_class)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device {device}; torch {torch.__version__}; {args.backbone} at {args.size} px, batch {args.batch}; "
        f"{args.workers} loader workers; {200 * args.per_class} JPEGs 500x375 in {args.data / 'cub'}"
    )
    print("(a) step ceiling, training images/s on a device-resident batch:")
    ceiling = {}
    for mode in dict.fromkeys([*args.modes, args.e2e_mode]):
        ceiling[mode] = step_ceiling(args, mode)
        print(f"    {mode:<16} {ceiling[mode]:>9.0f}")
    print(f"(b) end-to-end training images/s ({args.e2e_mode}), share of the ceiling in that mode:")
    for pipeline in ("classic", "fast"):
        rate = end_to_end(args, args.e2e_mode, pipeline)
        print(f"    {pipeline:<16} {rate:>9.0f}   {rate / ceiling[args.e2e_mode]:>6.1%}")
    print(f"(c) evaluation, embedding images/s ({args.e2e_mode}):")
    for pipeline in ("classic", "fast"):
        print(f"    {pipeline:<16} {evaluation(args, args.e2e_mode, pipeline):>9.0f}")


if __name__ == "__main__":
    main()
