"""One description of how an image becomes the model's input, from which every consumer is derived: the
classic path's torchvision transforms, the fast path's batched transform
(:class:`~dml.data.fast_path.BatchTransform`), the embedder's file transform and the ``preprocessing.json``
written beside an exported model.

The evaluation steps, in order (``STEPS``, written into ``preprocessing.json``):

1. the image converted to ``color`` (``RGB``, or ``L`` for gray), 16-bit images to 8 bits (``v >> 8``);
2. resized with ``interpolation`` (antialiased, as PIL resizes): ``resize`` a number: its shorter side to
   ``resize`` and its longer side to ``int(resize * longer / shorter)``; ``resize`` a pair ``[h, w]``: to
   exactly that size;
3. centre-cropped to ``center_crop`` ``[h, w]`` (none when null): top ``round((H - h) / 2)``, left
   ``round((W - w) / 2)``, rounding halves to even (Python's ``round``, as torchvision);
4. values as float32 divided by 255 (``value_range`` [0, 1]) or not (``value_range`` [0, 255]);
5. channels reversed when ``channel_order`` is ``BGR``; a gray image repeated to ``channels``;
6. ``(x - mean) / std`` per channel; the model takes a batch of them as ``NCHW`` float32.

Training replaces steps 2-3 by a random resized crop to ``center_crop`` (area fraction drawn from
``crop_scale``, aspect ratio log-uniform in (3/4, 4/3)) and a random horizontal flip (``hflip``); with
``random_crop`` false it keeps the evaluation steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from dml.data.images import convert
from dml.errors import UserError

INTERPOLATIONS = ("bilinear", "bicubic")
STEPS = (
    "convert the image to `color` as PIL's Image.convert does (RGB, or L for gray with PIL's luma weights "
    "0.299, 0.587, 0.114; alpha dropped, palettes expanded; 16-bit images to 8 bits by v >> 8; EXIF "
    "orientation not applied)",
    "resize with `interpolation` as PIL's Image.resize does (antialiased; PIL's bicubic kernel, a = -0.5): "
    "`resize` a number: the shorter side to it and the longer side to int(resize * longer / shorter); "
    "`resize` [h, w]: to exactly that size",
    "centre-crop to `center_crop` [h, w] (none when null): top round((H - h) / 2), left round((W - w) / 2), "
    "rounding halves to even (Python's round: 58.5 -> 58)",
    "float32 values, divided by 255 when `value_range` is [0, 1]",
    "reverse the channels when `channel_order` is BGR; repeat a gray image to `channels`",
    "subtract `mean` and divide by `std`, per channel; batch as NCHW float32",
)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input (see the module's docstring for the steps).

    Attributes:
        color: ``RGB`` or ``L`` (gray), the mode images are converted to.
        channels: channels the model takes (a gray image is repeated to 3 for an RGB backbone).
        resize: the shorter side (a number), or the exact size ``(h, w)``.
        center_crop: the crop ``(h, w)`` after resizing, or ``None``.
        interpolation: ``bilinear`` or ``bicubic``.
        channel_order: ``RGB`` or ``BGR`` (Caffe-style backbones); ``gray`` images have one order.
        value_range: 1 for values in [0, 1], 255 for [0, 255].
        mean, std: per channel, in the scale of ``value_range``.
        crop_scale: training: the random resized crop's area fraction range.
        hflip: training: random horizontal flips.
        random_crop: training: random resized crops (False: the evaluation resize and crop).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | tuple[int, int]
    center_crop: tuple[int, int] | None = None
    color: str = "RGB"
    channels: int = 3
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    value_range: int = 1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    random_crop: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "mean", tuple(float(m) for m in self.mean))
        set_(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.resize, int):
            set_(self, "resize", _pair(self.resize))
        if self.center_crop is not None:
            set_(self, "center_crop", _pair(self.center_crop))
        set_(self, "crop_scale", (float(self.crop_scale[0]), float(self.crop_scale[1])))
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(
                f"dataset.interpolation={self.interpolation!r} must be one of {', '.join(INTERPOLATIONS)}"
            )
        if self.color not in ("RGB", "L") or self.channel_order not in ("RGB", "BGR"):
            raise UserError(f"color={self.color!r}, channel_order={self.channel_order!r}: RGB/L and RGB/BGR")
        if self.value_range not in (1, 255):
            raise UserError(f"value_range={self.value_range} must be 1 or 255")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(
                f"dataset.mean={list(self.mean)} and dataset.std={list(self.std)} need one value per channel "
                f"({self.channels})"
            )
        if isinstance(self.resize, int) and self.center_crop and self.resize < max(self.center_crop):
            raise UserError(
                f"dataset.resize_size={self.resize} is smaller than dataset.image_size={max(self.center_crop)}: "
                "the evaluation's centre crop would not fit; set resize_size >= image_size"
            )
        if (
            not isinstance(self.resize, int)
            and self.center_crop
            and any(c > r for c, r in zip(self.center_crop, self.resize, strict=True))
        ):
            raise UserError(f"center_crop={list(self.center_crop)} is larger than resize={list(self.resize)}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        if self.center_crop is not None:
            return self.center_crop
        if isinstance(self.resize, int):
            raise UserError("a shorter-side resize without a centre crop gives images of many sizes")
        return self.resize

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after step 2 for an image of ``height`` x ``width``."""
        if not isinstance(self.resize, int):
            return self.resize
        short, long = sorted((height, width))
        size = (self.resize, int(self.resize * long / short))
        return size if height <= width else (size[1], size[0])

    # --- derived consumers ------------------------------------------------------------------------------
    def transform(self, stage: str) -> Callable[[Image.Image], torch.Tensor]:
        """The classic path's torchvision transform of a PIL image for ``train`` or evaluation (``eval``)."""
        mode = T.InterpolationMode(self.interpolation)
        steps: list[Callable] = [ConvertColor(self.color)]
        if stage == "train" and self.random_crop:
            steps.append(T.RandomResizedCrop(self.input_size, scale=self.crop_scale, interpolation=mode))
        else:
            steps.append(T.Resize(self.resize, interpolation=mode))
            if self.center_crop is not None:
                steps.append(T.CenterCrop(self.center_crop))
        if stage == "train" and self.hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.PILToTensor(), self.tensor_transform()]
        return T.Compose(steps)

    def tensor_transform(self) -> TensorSteps:
        """Steps 4-6 on a (C, H, W) tensor of uint8 values, or of floats already in [0, 1] (the in-memory
        datasets' images)."""
        return TensorSteps(self)

    def batch_transform(self) -> Any:
        """The fast path's batched decoding and transform (:class:`~dml.data.fast_path.BatchTransform`)."""
        from dml.data.fast_path import BatchTransform

        return BatchTransform(self)

    def to_json(self) -> dict[str, Any]:
        """What ``preprocessing.json`` says: the evaluation steps and their values (training fields left out)."""
        return {
            "format": "dml preprocessing 2",  # 1: before color, channels and steps (resize_shorter_side)
            "input": "image file",
            "color": self.color,
            "resize": self.resize if isinstance(self.resize, int) else list(self.resize),
            "interpolation": self.interpolation,
            "center_crop": list(self.center_crop) if self.center_crop else None,
            "value_range": [0, self.value_range],
            "channel_order": "gray" if self.color == "L" else self.channel_order,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW float32",
            "steps": [f"{i}. {step}" for i, step in enumerate(STEPS, start=1)],
        }


class ConvertColor:
    """Step 1 on a PIL image (picklable for loader workers)."""

    def __init__(self, color: str):
        self.color = color

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.color else convert(image, self.color)

    def __repr__(self) -> str:
        return f"ConvertColor({self.color!r})"


class TensorSteps:
    """Steps 4-6: value range, channel order, gray repeated to ``channels``, normalisation."""

    def __init__(self, pre: Preprocessing):
        self.scale, self.bgr = pre.value_range, pre.channel_order == "BGR" and pre.color == "RGB"
        self.channels = pre.channels
        self.mean = torch.tensor(pre.mean).view(-1, 1, 1)
        self.std = torch.tensor(pre.std).view(-1, 1, 1)
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255 if self.scale == 1 else x.float()
        elif self.scale == 255:  # floats are already in [0, 1]
            x = x * 255
        return self._rest(x)

    def _rest(self, x: torch.Tensor) -> torch.Tensor:
        """Channel order, channel count, normalisation, on values already in the value range."""
        if self.bgr:
            x = x.flip(-3)
        if x.shape[-3] == 1 and self.channels != 1:
            x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
        mean, std = self._on(x.device)
        return (x - mean) / std

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, copied there once (a copy per batch would hold the host)."""
        if device not in self._copies:
            self._copies[device] = (self.mean.to(device), self.std.to(device))
        return self._copies[device]

    def from_255(self, x: torch.Tensor) -> torch.Tensor:
        """The same steps on float values in [0, 255] (the fast path's resized images): no round trip
        through [0, 1] for a value range of 255."""
        return self._rest(x / 255 if self.scale == 1 else x)

    def __repr__(self) -> str:
        return f"TensorSteps(scale={self.scale}, bgr={self.bgr}, channels={self.channels})"
