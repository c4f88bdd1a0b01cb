"""Image files to 8-bit pixels, whatever their bit depth: every reader (the datasets, the fast path, the
embedder, the result pages) goes through here, so that a 16-bit image is not read as white.

PIL converts a 16-bit grayscale image (mode ``I;16``) to ``L`` or ``RGB`` by clipping at 255, and the
fast path's decoder returns 16-bit PNGs as uint16; both are brought to 8 bits the same way here, by
dropping the low byte (``v >> 8``), which is what PIL does itself for 16-bit colour PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image


class UnsupportedPixels(ValueError):
    """An image whose pixel values have no 8-bit meaning (floating point, or 32-bit beyond 16 bits)."""


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit channels: 16-bit grayscale (``I;16*``, or ``I`` within 0..65535) scaled down to
    ``L``; other modes as they are (PIL converts those itself).

    Raises:
        UnsupportedPixels: floating-point pixels (mode ``F``), or 32-bit values outside 0..65535.
    """
    if image.mode == "F":
        raise UnsupportedPixels(
            "its pixels are floating-point numbers (mode F); save it as an 8- or 16-bit image"
        )
    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UnsupportedPixels(
            f"its pixels are 32-bit values from {values.min()} to {values.max()}; save it as an 8- or "
            "16-bit image"
        )
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def convert(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` in ``mode`` (``RGB`` or ``L``) with 8-bit channels; see :func:`to_8bit`."""
    return to_8bit(image).convert(mode)


def open_image(path: str | Path | IO[bytes], mode: str = "RGB") -> Image.Image:
    """The image file at ``path``, decoded, in ``mode`` with 8-bit channels.

    Raises:
        OSError: the file is missing or cannot be decoded.
        UnsupportedPixels: see :func:`to_8bit`.
    """
    with Image.open(path) as image:
        return convert(image, mode)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image tensor (torchvision's ``decode_image``) as uint8: 16-bit values scaled down as
    :func:`to_8bit` does."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    raise UnsupportedPixels(f"decoded pixels of type {image.dtype}; save it as an 8- or 16-bit image")


def unreadable_message(path: str | Path, error: Exception) -> str:
    """What to say of an image that cannot be read, on every input path."""
    return (
        f"cannot read image {path}: {error}; replace the file and prepare the dataset again (delete its "
        "dml_index.json)"
    )
