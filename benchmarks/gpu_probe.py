"""The fast path on a GPU, taken apart: decode, augmentation and the training step timed separately,
odd inputs through the decoders, and the stream hazard of torchvision issue 9606.

    python -m benchmarks.gpu_probe [--device cuda] [--images 180] [--backbone resnet50] [--size 224]
        [--repeats 5] [--json probe.json]

(a) Stages, on ``--images`` CUB-sized JPEGs (500 x 375, natural-image statistics): the batched decode
    (nvJPEG on a GPU), the training augmentation (random resized crops, flips, normalisation), and one
    training step of the module (bf16 + channels_last on a GPU), each timed alone (CUDA events; the
    median of ``--repeats``), with images/s and the decode + augmentation time as a share of the step's.
(b) Odd inputs (CMYK, progressive, grayscale JPEGs, a PNG, a 16-bit PNG): whether the header check sends
    them to the workers, how many the training process had to decode on the CPU after a refusal, and the
    largest difference from PIL's decode (nvJPEG and libjpeg round a little differently).
(c) The stream hazard: kernels queued on a stream read a buffer that is freed before the batched
    decode; nvJPEG may write its output into that memory while the kernels still read it. Counts the
    trials whose kernel results changed, in four modes (HAZARD_MODES): the caller's stream drained
    first, nothing waited for, and dml's decode on its input stream with the reads queued on the
    caller's stream or on the input stream itself (a GPU only).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from benchmarks.throughput import natural_jpeg
from dml.builders import build_module
from dml.config import compose
from dml.data.decoding import batch_decodable, decode, fallbacks, input_stream
from dml.data.fast_path import Encoded, EncodedBatch, EncodedCollate
from dml.data.images import open_image
from dml.data.preprocessing import Preprocessing

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timed(device: torch.device, work: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``work`` over ``repeats`` runs after one warm-up (CUDA events on a GPU)."""
    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            work()
            times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


def stages(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    data = [torch.frombuffer(bytearray(natural_jpeg(seed)), dtype=torch.uint8) for seed in range(args.images)]
    resize = round(args.size / 0.875)
    transform = Preprocessing(*IMAGENET, resize=resize, center_crop=(args.size, args.size)).batch_transform()
    batch = EncodedBatch(data, train=True)
    images = decode(batch.data, device, batch.names)
    generator = torch.Generator().manual_seed(0)
    module = build_module(
        compose(
            [
                "experiment=proxy_anchor_cub_r50",
                f"backbone.name={args.backbone}",
                "backbone.pretrained=false",
                "dataset.num_train_classes=100",
            ]
        )
    ).to(device)
    gpu = device.type == "cuda"
    if gpu:
        module.backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    inputs = transform.augment(images, generator)
    inputs = inputs.contiguous(memory_format=torch.channels_last) if gpu else inputs
    labels = torch.randint(0, 100, (len(data),), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = module.loss(module(inputs), labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ms = {
        "decode": timed(device, lambda: decode(batch.data, device, batch.names), args.repeats),
        "augment": timed(device, lambda: transform.augment(images, generator), args.repeats),
        "step": timed(device, step, args.repeats),
    }
    out = {f"{k}_ms": v for k, v in ms.items()}
    out |= {f"{k}_images_per_s": len(data) / (v / 1000) for k, v in ms.items()}
    out["input_share_of_step"] = (ms["decode"] + ms["augment"]) / ms["step"]
    return out


def odd(kind: str) -> bytes:
    pixels = np.random.default_rng(len(kind)).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    image, options, fmt = Image.fromarray(pixels, "RGB"), {}, "JPEG"
    if kind == "cmyk":
        image = image.convert("CMYK")
    elif kind == "progressive":
        options = {"progressive": True}
    elif kind == "grayscale":
        image = image.convert("L")
    elif kind in ("png", "png16"):
        fmt, image = "PNG", image.convert("I;16") if kind == "png16" else image
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def odd_inputs(device: torch.device) -> dict[str, dict[str, float | bool]]:
    out: dict[str, dict[str, float | bool]] = {}
    for kind in ("baseline", "cmyk", "progressive", "grayscale", "png", "png16"):
        data = torch.frombuffer(bytearray(odd(kind)), dtype=torch.uint8)
        before = fallbacks()
        batch, _, _ = EncodedCollate(train=False)([(Encoded(data, kind), 0, 0)])  # what a worker does
        (image,) = decode(batch.data, device, batch.names)
        reference = torch.from_numpy(np.asarray(open_image(io.BytesIO(odd(kind)), "RGB")).copy()).permute(
            2, 0, 1
        )
        out[kind] = {
            "batch_decoder": batch_decodable(data),
            "decoded_in_worker": batch.decoded_in_workers == 1,
            "cpu_fallbacks": fallbacks() - before,
            "max_abs_diff_vs_pil": float((image.cpu().int() - reference.int()).abs().max()),
        }
    return out


HAZARD_MODES = {
    "drain": "the caller's stream drained, then nvJPEG on it (dml before the input stream)",
    "none": "nvJPEG on the caller's stream, nothing waited for (the hazard itself)",
    "input_stream": "dml's decode: nvJPEG on the input stream, the caller's stream not waited for",
    "input_stream_own": "dml's decode, with the queued reads on the input stream itself",
}


def hazard(device: torch.device, trials: int = 20) -> dict[str, int | str]:
    """Per mode of :data:`HAZARD_MODES`: how many trials' queued kernel results changed (corrupted) and
    how many handed the decoder the freed block (block_reused: the hazard was provoked)."""
    if device.type != "cuda":
        return {"status": "skipped: no CUDA device"}
    data = [torch.frombuffer(bytearray(natural_jpeg(seed)), dtype=torch.uint8) for seed in range(32)]

    def trial(mode: str) -> tuple[bool, bool]:
        """(the queued kernel's result changed, the decoder was given the freed block)."""
        queue = input_stream(device) if mode == "input_stream_own" else torch.cuda.current_stream(device)
        with torch.cuda.stream(queue):
            # `source` has a decoded image's size, so the allocator can hand its block to the decoder
            source = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, device=device)
            expected = source.float() * 2
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)  # about 0.1 s of queued work before the read below
            result = source.float() * 2  # queued: reads `source` only once the sleep is done
            freed = source.data_ptr()
            del source  # its block is free for the next allocation on this stream, the read still to come
        if mode == "drain":
            torch.cuda.current_stream(device).synchronize()
        if mode in ("drain", "none"):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        else:
            images = decode(data, device)
        reused = any(image.data_ptr() <= freed < image.data_ptr() + image.numel() for image in images)
        torch.cuda.synchronize()
        return not torch.equal(result, expected), reused

    out: dict[str, int | str] = {"trials": trials}
    for mode in HAZARD_MODES:
        results = [trial(mode) for _ in range(trials)]
        out[f"corrupted_{mode}"] = sum(c for c, _ in results)
        out[f"block_reused_{mode}"] = sum(r for _, r in results)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=180)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "images": args.images,
        "stages": stages(args, device),
        "odd_inputs": odd_inputs(device),
        "stream_hazard": hazard(device),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
