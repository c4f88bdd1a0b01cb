"""Antialiased resizing of a batch of differently sized images, each from its own box, in a handful of
launches: the fast path's crop and resize without one launch per image.

An antialiased resize is separable: along each axis every output sample is a normalised weighted sum of
input samples (PIL's ``ImagingResample``, which ``torch.nn.functional.interpolate(antialias=True)``
follows). For output sample ``i`` of an axis resized from ``length`` to ``size`` samples,
``scale = length / size``, ``center = (i + 0.5) * scale``, ``support = s * max(scale, 1)`` (``s`` the
kernel's: 1 bilinear, 2 bicubic), the taps are ``r`` in ``[trunc(center - support + 0.5),
trunc(center + support + 0.5))`` clipped to the box, weighted ``kernel((r - center + 0.5) / max(scale,
1))`` and normalised to sum 1. Written as a matrix per image and axis, the resize of image ``n`` is
``Wy[n] @ image[n] @ Wx[n].T``; a box is a band of non-zero columns, a horizontal flip reverses the rows
of ``Wx``, and a centre crop of a resized image keeps some of the rows. The images are padded to one
size (zeros, which no weight reaches), and the whole batch is two batched matrix products.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
CHUNK_BYTES = 1 << 30  # the padded float images are built this many bytes at a time, at most


def kernel(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The resampling kernel at ``x``: the triangle (bilinear), or Keys' cubic with a = -0.5 (bicubic, as
    PIL and torch's antialiased bicubic)."""
    x = x.abs()
    if mode == "bilinear":
        return (1 - x).clamp_(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def axis_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    count: int,
    extent: int,
    mode: str,
) -> torch.Tensor:
    """(N, count, extent) resampling weights along one axis.

    Args:
        start, length: (N,) each image's box along the axis (in input samples).
        size: (N,) the length the box is resized to.
        offset: (N,) the first output sample kept (a centre crop's; 0 for none).
        count: output samples kept per image (``offset`` to ``offset + count`` of ``size``).
        extent: the padded input length.
        mode: ``bilinear`` or ``bicubic``.
    """
    device = start.device
    start, length, size, offset = (t.to(torch.float64) for t in (start, length, size, offset))
    scale = length / size
    stretch = scale.clamp(min=1)  # downsampling widens the kernel: antialiasing
    support = SUPPORT[mode] * stretch
    i = torch.arange(count, device=device, dtype=torch.float64) + offset[:, None]
    center = (i + 0.5) * scale[:, None]  # (N, count), in box coordinates: exact in float64
    first = torch.trunc(center - support[:, None] + 0.5).clamp(min=0).float()
    stop = torch.minimum(torch.trunc(center + support[:, None] + 0.5), length[:, None]).float()
    # the (N, count, extent) tensors in float32, built in place: a batch's weights are its largest temporaries
    r = (torch.arange(extent, device=device, dtype=torch.float64) - start[:, None]).float()[:, None, :]
    x = r - (center - 0.5).float()[..., None]
    w = kernel(x.div_(stretch.float()[:, None, None]), mode)
    w.mul_((r >= first[..., None]) & (r < stop[..., None]))
    return w.div_(w.sum(-1, keepdim=True).clamp_(min=torch.finfo(w.dtype).tiny))


def resample(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    sizes: torch.Tensor,
    offsets: torch.Tensor,
    out: tuple[int, int],
    mode: str = "bilinear",
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's box resized, cropped and optionally flipped: (N, C, *out) floats in the input's range.

    Args:
        images: N (C, h, w) uint8 images of any sizes, on one device.
        boxes: (N, 4) (top, left, height, width) of the part of each image to resize.
        sizes: (N, 2) the (height, width) each box is resized to.
        offsets: (N, 2) the (top, left) of the ``out`` window kept of each resized box.
        out: (height, width) of every result.
        mode: ``bilinear`` or ``bicubic`` (antialiased, as PIL resizes).
        flip: (N,) bool, the images to mirror left to right after resizing.
    """
    device = images[0].device
    channels = images[0].shape[0]
    boxes, sizes, offsets = (t.to(device, non_blocking=True) for t in (boxes, sizes, offsets))
    results, start = [], 0
    for chunk in _chunks([(image.shape[-2], image.shape[-1]) for image in images], channels):
        end = start + chunk
        part = slice(start, end)
        padded = _padded(images[part])
        height, width = padded.shape[-2:]
        wy = axis_weights(
            boxes[part, 0], boxes[part, 2], sizes[part, 0], offsets[part, 0], out[0], height, mode
        )
        wx = axis_weights(
            boxes[part, 1], boxes[part, 3], sizes[part, 1], offsets[part, 1], out[1], width, mode
        )
        if flip is not None:
            wx = torch.where(flip[part].to(device, non_blocking=True)[:, None, None], wx.flip(1), wx)
        # the cheaper order of the two products
        if out[1] * height * (width + out[0]) <= out[0] * width * (height + out[1]):
            result = wy[:, None] @ (padded @ wx.transpose(1, 2)[:, None])
        else:
            result = (wy[:, None] @ padded) @ wx.transpose(1, 2)[:, None]
        results.append(result)
        start = end
    return results[0] if len(results) == 1 else torch.cat(results)


def _chunks(shapes: list[tuple[int, int]], channels: int) -> list[int]:
    """How many images go into each padded block, in order, so that a block's floats stay under
    ``CHUNK_BYTES`` (one image at least)."""
    counts, count, height, width = [], 0, 0, 0
    for h, w in shapes:
        grown = (count + 1) * channels * max(height, h) * max(width, w) * 4
        if count and grown > CHUNK_BYTES:
            counts.append(count)
            count, height, width = 0, 0, 0
        count, height, width = count + 1, max(height, h), max(width, w)
    return [*counts, count] if count else counts


def _padded(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, C, max h, max w) floats, zero beyond each image: a nested tensor's padding, one copy of the
    bytes and one padding kernel on a GPU."""
    with warnings.catch_warnings():  # the strided nested layout is marked a prototype
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
        nested = torch.nested.as_nested_tensor(list(images))
    return nested.float().to_padded_tensor(0.0)
