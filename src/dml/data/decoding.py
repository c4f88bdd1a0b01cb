"""Decoding the fast path's images: which JPEGs the batched (nvJPEG) decoder takes, the rest decoded one by
one on the CPU, in the loader workers where possible.

nvJPEG's batched decoder takes baseline Huffman JPEGs of 1 or 3 components (YCbCr, with the usual chroma
subsampling). Anything else (progressive or lossless JPEGs, CMYK or Adobe-RGB ones, unusual subsampling,
PNG, WebP, BMP, 16-bit images) is found by :func:`batch_decodable` from its header, in the workers, and
decoded there (:func:`decode_one`): the training process only decodes what the GPU takes. A JPEG that
the batched decoder still refuses is retried alone and, refused again, decoded on the CPU; that is
logged once per process and counted (:func:`fallbacks`).

On a GPU the decoder runs on a private stream of its own (:func:`input_stream`), so that decoding the
next batch overlaps the step still running on the compute stream. That also keeps nvJPEG out of the
compute stream's memory: its hardware engine writes its output without waiting for the work queued
before it (torchvision issue 9606), and the caching allocator hands a stream only blocks freed on that
same stream. Before each batched decode the private stream alone is waited for (the previous batch's
transform, queued long before), never the compute stream; the results reach the caller's stream by a
stream wait, and ``record_stream`` keeps their blocks from the decoder until the caller is done.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from dml.data.images import UnsupportedPixels, open_image, to_uint8, unreadable_message
from dml.errors import UserError
from dml.log import get_logger

log = get_logger(__name__)

BATCH_FRAMES = (0xC0, 0xC1)  # baseline and extended sequential Huffman frames
OTHER_FRAMES = {
    0xC2,
    0xC3,
    0xC5,
    0xC6,
    0xC7,
    0xC9,
    0xCA,
    0xCB,
    0xCD,
    0xCE,
    0xCF,
}  # progressive, lossless, ...
LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}  # 4:4:4, 4:2:2 (both ways), 4:2:0; chroma at (1, 1)
_fallbacks = {"count": 0}
_streams: dict[torch.device, torch.cuda.Stream] = {}


def batch_decodable(data: torch.Tensor) -> bool:
    """Whether the batched JPEG decoder takes these encoded bytes (a 1-D uint8 tensor): a baseline Huffman
    JPEG of 8-bit samples, gray or YCbCr with 4:4:4, 4:2:2 or 4:2:0 subsampling. Read from the header
    alone; anything it cannot read (another format, a damaged file) is left to :func:`decode_one`."""
    raw = memoryview(cast(Any, data.numpy())) if len(data) else memoryview(b"")  # no copy
    if len(raw) < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return False
    i, adobe_transform, jfif = 2, None, False
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return False
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = raw[i + 2] << 8 | raw[i + 3]
        segment = raw[i + 4 : i + 2 + length]
        if marker == 0xEE and bytes(segment[:5]) == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]  # 0: RGB or CMYK samples, not YCbCr
        jfif |= marker == 0xE0 and bytes(segment[:4]) == b"JFIF"
        if marker in BATCH_FRAMES:
            if len(segment) < 6:
                return False
            precision, components = segment[0], segment[5]
            if precision != 8 or components not in (1, 3) or len(segment) < 6 + 3 * components:
                return False
            if components == 1:
                return True
            factors = [(segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 15) for c in range(3)]
            ids = bytes(segment[6 + 3 * c] for c in range(3))
            rgb = adobe_transform == 0 or (
                not jfif and adobe_transform is None and ids == b"RGB"
            )  # as libjpeg
            return not rgb and factors[0] in LUMA_SAMPLING and factors[1] == factors[2] == (1, 1)
        if marker in OTHER_FRAMES or marker == 0xDA:  # another frame, or a scan before any frame
            return False
        i += 2 + length
    return False


def named(names: Sequence[str] | None, count: int) -> list[str]:
    """``names`` as a list, or the images' places in their batch where they have none."""
    return list(names) if names is not None else [f"image {i} of the batch" for i in range(count)]


def decode_one(data: torch.Tensor, name: str) -> torch.Tensor:
    """One image as a (3, H, W) uint8 RGB tensor on the CPU: torchvision's decoders (JPEG, PNG, WebP,
    GIF), else PIL's (BMP, TIFF, ...).

    Raises:
        UserError: neither can decode it; the message names the file.
    """
    try:
        return to_uint8(decode_image(data, mode=ImageReadMode.RGB))
    except RuntimeError:
        pass  # a format torchvision does not read, or a damaged file: PIL tells which
    try:
        image = open_image(io.BytesIO(data.numpy().tobytes()), "RGB")
    except (OSError, UnsupportedPixels) as e:
        raise UserError(unreadable_message(name, e)) from e
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def fallbacks() -> int:
    """How many JPEGs that looked batch-decodable this process still had to decode on the CPU."""
    return _fallbacks["count"]


def _fell_back(name: str, error: Exception) -> None:
    _fallbacks["count"] += 1
    if _fallbacks["count"] == 1:
        log.warning(
            "the batched JPEG decoder refused %s (%s): decoded on the CPU in the training process; further "
            "ones are counted, not logged (dml.data.decoding.fallbacks())",
            name,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )


def cuda_device(device: torch.device | str) -> torch.device:
    """``device``, a CUDA one with its index (``cuda`` and ``cuda:0`` must not make torchvision build a
    second decoder)."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device


def input_stream(device: torch.device | str) -> torch.cuda.Stream:
    """The private stream that the fast path decodes and transforms on, one per CUDA device."""
    device = cuda_device(device)
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def handed_over(
    tensors: list[torch.Tensor], stream: torch.cuda.Stream, caller: torch.cuda.Stream
) -> list[torch.Tensor]:
    """``tensors`` made on ``stream`` made safe to use on ``caller``: the caller waits for the work queued
    on ``stream`` so far, and their blocks are not reused until the caller's work queued so far is done."""
    if caller != stream:
        caller.wait_stream(stream)
        for tensor in tensors:
            tensor.record_stream(caller)
    return tensors


def decode(
    data: Sequence[torch.Tensor],
    device: torch.device | str,
    names: Sequence[str] | None = None,
    checked: bool = False,
) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images on ``device``, ready on the caller's current stream. ``data``: per image
    its encoded bytes (1-D) or its pixels already decoded in a loader worker ((3, H, W)). The bytes
    :func:`batch_decodable` accepts (all of them when ``checked``: an :class:`EncodedCollate` batch's, sorted
    in the workers) are decoded together (on the GPU with a CUDA device, on :func:`input_stream`); a
    batch the decoder refuses is retried image by image, and an image refused alone is decoded on the CPU
    (logged once, counted); other bytes are decoded one by one on the CPU.

    Raises:
        UserError: an image cannot be decoded; the message names it (``names``: one per image).
    """
    device = cuda_device(device)
    if device.type != "cuda":
        return _decode(data, device, names, checked)
    stream, caller = input_stream(device), torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        images = _decode(data, device, names, checked)
    return handed_over(images, stream, caller)


def _decode(
    data: Sequence[torch.Tensor], device: torch.device, names: Sequence[str] | None, checked: bool
) -> list[torch.Tensor]:
    """:func:`decode` on the current stream (on a GPU: the input stream)."""
    names = named(names, len(data))
    out: list[torch.Tensor | None] = [d if d.ndim == 3 else None for d in data]
    batch = [i for i, d in enumerate(data) if d.ndim == 1 and (checked or batch_decodable(d))]
    target = device if device.type == "cuda" else torch.device("cpu")
    if batch:
        if device.type == "cuda":
            # nvJPEG writes without waiting for the work queued on its stream: let the input stream's
            # own work (the previous batch's transform, reading blocks this output may reuse) finish.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg([data[i] for i in batch], mode=ImageReadMode.RGB, device=target)
        except RuntimeError:
            decoded = [_alone(data[i], names[i], target) for i in batch]
        for i, image in zip(batch, decoded, strict=True):
            out[i] = image
    images = [image if image is not None else decode_one(data[i], names[i]) for i, image in enumerate(out)]
    return [image.to(device, non_blocking=True) for image in images]


def _alone(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """One JPEG of a batch the batched decoder refused: by itself, else on the CPU."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        _fell_back(name, e)
        return decode_one(data, name)
