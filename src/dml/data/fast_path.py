"""The fast input path: loader workers only read encoded image bytes; decoding (on the GPU when there is
one) and augmentation run batched on the training device.

The classic path (PIL decode + RandomResizedCrop + ToTensor in the workers) tops out near 1,100 images/s
with 16 workers, a fifth of what an H100 trains ResNet-50 at. Here a batch leaves the loader as
``(EncodedBatch, labels, positions)``; :meth:`BatchTransform.__call__` turns the ``EncodedBatch`` into the
normalised float batch on the device: ``torchvision.io.decode_jpeg`` on the whole batch (nvJPEG on a
GPU), then the training augmentation with the classic path's law (random resized crop with scale
(0.08, 1) and log-uniform aspect ratio in (3/4, 4/3), ten tries then a centre crop; horizontal flip) or
the evaluation resize and centre crop, antialiased, all images at once (:mod:`dml.data.resampling`),
and normalisation (the module puts the batch in channels_last when ``model.channels_last`` is on). On a
GPU this runs on a stream of its own, so that the next batch is decoded while the step still runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torchvision.io import encode_jpeg

from dml.data.decoding import (
    batch_decodable,
    cuda_device,
    decode,
    decode_one,
    handed_over,
    input_stream,
    named,
)
from dml.data.images import unreadable_message
from dml.data.preprocessing import Preprocessing
from dml.data.resampling import resample
from dml.errors import UserError

PIPELINES = ("auto", "classic", "fast")


class Encoded(NamedTuple):
    """One image's encoded bytes (a 1-D uint8 tensor) and where they came from (for error messages)."""

    data: torch.Tensor
    name: str


class EncodedBatch:
    """A batch of encoded images, kept on the CPU by Lightning's batch transfer (a plain object, not a
    collection): the decoder reads it from there. The images travel from the loader workers as one
    uint8 buffer and their lengths (one shared-memory block a batch, not one per image); an image the
    batched decoder does not take travels decoded, as its pixels with their ``shape``. ``names`` say
    where each came from, so that an image that does not decode is named. ``checked``: the workers
    sorted the images (:class:`EncodedCollate`), so that every one still encoded is batch-decodable and
    the decoder need not read the headers again."""

    __slots__ = ("buffer", "checked", "lengths", "names", "shapes", "train")

    def __init__(
        self,
        data: Sequence[torch.Tensor],
        train: bool,
        names: Sequence[str] | None = None,
        shapes: Sequence[tuple[int, ...] | None] | None = None,
        checked: bool = False,
    ):
        flat = [d.reshape(-1) for d in data]
        self.buffer = torch.cat(flat) if len(flat) else torch.empty(0, dtype=torch.uint8)
        self.lengths = [len(d) for d in flat]
        # decoded pixels are (3, H, W); encoded bytes 1-D
        self.shapes = (
            list(shapes) if shapes is not None else [tuple(d.shape) if d.ndim == 3 else None for d in data]
        )
        self.names = named(names, len(data))
        self.train, self.checked = train, checked

    @property
    def data(self) -> list[torch.Tensor]:
        """Each image's bytes (1-D), or its decoded pixels ((3, H, W)): views of the buffer."""
        parts = torch.split(self.buffer, self.lengths)
        return [p if shape is None else p.view(shape) for p, shape in zip(parts, self.shapes, strict=True)]

    @property
    def decoded_in_workers(self) -> int:
        """How many of its images the loader workers decoded (those the batched decoder does not take)."""
        return sum(shape is not None for shape in self.shapes)

    def pin_memory(self) -> EncodedBatch:
        """The batch with its buffer in page-locked memory (the DataLoader's pin_memory thread calls it):
        the decoder's host-to-device copy of the bytes then runs without staging."""
        self.buffer = self.buffer.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.lengths)


class EncodedFiles:
    """An image source giving each file's bytes and path (:class:`Encoded`; no decoding in the workers)."""

    def __init__(self, root: Path, paths: Sequence[str]):
        self.root, self.paths = Path(root), list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Encoded:
        path = self.root / self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(unreadable_message(path, e)) from e
        # an empty file is named by the decoder, like any other it cannot read
        tensor = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        return Encoded(tensor, str(path))


class EncodedTensors:
    """An image source giving (N, 3, H, W) uint8 images held in memory as JPEG bytes (quality 95)."""

    def __init__(self, images: torch.Tensor, quality: int = 95):
        self.data = [encode_jpeg(image, quality=quality) for image in images]

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> Encoded:
        return Encoded(self.data[index], f"in-memory image {index}")


class EncodedCollate:
    """A DataLoader collate_fn for items (:class:`Encoded`, label, position), run in the loader workers:
    images the batched decoder does not take (:func:`~dml.data.decoding.batch_decodable`: progressive or
    CMYK JPEGs, PNGs, ...) are decoded here, the others stay encoded. A class, not a closure, so that
    workers started by spawn or forkserver can unpickle it."""

    def __init__(self, train: bool):
        self.train = train

    def __call__(
        self, items: list[tuple[Encoded, int, int]]
    ) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
        encoded, labels, positions = zip(*items, strict=True)
        data, shapes = [], []
        for e in encoded:
            pixels = None if batch_decodable(e.data) else decode_one(e.data, e.name)
            data.append(e.data if pixels is None else pixels)
            shapes.append(None if pixels is None else tuple(pixels.shape))
        batch = EncodedBatch(data, self.train, [e.name for e in encoded], shapes, checked=True)
        return batch, torch.tensor(labels), torch.tensor(positions)


def crop_boxes(
    sizes: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, 4) crop boxes (top, left, height, width) for images of ``sizes`` (N, 2) = (height, width).

    The law of ``torchvision.transforms.RandomResizedCrop.get_params``, drawn for every image at once: up
    to ``tries`` draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio), the first that
    fits is placed uniformly; images where none fits get the centre crop clamped to ``ratio``.
    """
    n = len(sizes)
    height, width = sizes[:, 0].double(), sizes[:, 1].double()
    area = (height * width)[:, None]
    target = area * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = log_ratio.exp()
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.double().argmax(1)  # the first try that fits (0 when none does)
    found = fits.any(1)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]

    # the fall-back centre crop
    in_ratio = width / height
    fw = torch.where(
        in_ratio < ratio[0], width, torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    )
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(
        found, torch.floor(u[:, 0] * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor")
    )
    left = torch.where(
        found, torch.floor(u[:, 1] * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor")
    )
    return torch.stack([top, left, h, w], 1).long()


class BatchTransform:
    """Decoded uint8 images -> a normalised (B, C, H, W) float batch, augmented for training: the steps of a
    :class:`~dml.data.preprocessing.Preprocessing` (resizing antialiased, as PIL resizes), batched on the
    device: every image's crop, resize and flip in one :func:`~dml.data.resampling.resample`. On a GPU it
    all runs on the input stream (:func:`~dml.data.decoding.input_stream`), overlapping the compute
    stream's work, and the batch is handed to the caller's stream. Build it with
    :meth:`Preprocessing.batch_transform`.
    """

    def __init__(self, preprocessing: Preprocessing):
        if preprocessing.color != "RGB":
            raise UserError(
                "the fast input path decodes RGB images; use dataset.pipeline=classic for gray ones"
            )
        self.preprocessing = preprocessing
        self.hflip, self.augment_crops = preprocessing.hflip, preprocessing.random_crop
        self.steps = preprocessing.tensor_transform()

    def __call__(
        self, batch: EncodedBatch, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The batch decoded and transformed on ``device``; training draws from ``generator`` (CPU)."""
        device = cuda_device(device)
        if device.type != "cuda":
            return self._transform(batch, device, generator)
        stream, caller = input_stream(device), torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            out = self._transform(batch, device, generator)
        return handed_over([out], stream, caller)[0]

    def _transform(
        self, batch: EncodedBatch, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        images = decode(batch.data, device, batch.names, checked=batch.checked)
        return self.augment(images, generator) if batch.train else self.evaluate(images)

    def augment(self, images: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crop (or the evaluation resize and crop), then a random horizontal flip,
        normalised."""
        if not self.augment_crops:
            boxes, sizes, offsets = self._evaluation_boxes(images)
        else:
            sizes = torch.tensor([image.shape[-2:] for image in images])
            boxes = crop_boxes(sizes, scale=self.preprocessing.crop_scale, generator=generator)
            sizes = torch.tensor([self.preprocessing.input_size] * len(images))
            offsets = torch.zeros_like(sizes)
        flip = torch.rand(len(images), generator=generator) < 0.5 if self.hflip else None
        return self._resample(images, boxes, sizes, offsets, flip)

    def evaluate(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The evaluation resize (torchvision's Resize rounding), then the centre crop."""
        return self._resample(images, *self._evaluation_boxes(images))

    def _evaluation_boxes(
        self, images: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole-image boxes, each image's resized size and the centre crop's (top, left) in it."""
        crop = self.preprocessing.input_size
        boxes, sizes, offsets = [], [], []
        for image in images:
            height, width = image.shape[-2:]
            size = self.preprocessing.resized_size(height, width)
            boxes.append((0, 0, height, width))
            sizes.append(size)
            # Python's round: halves to even, as torchvision's CenterCrop
            offsets.append((int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))))
        return torch.tensor(boxes), torch.tensor(sizes), torch.tensor(offsets)

    def _resample(
        self,
        images: list[torch.Tensor],
        boxes: torch.Tensor,
        sizes: torch.Tensor,
        offsets: torch.Tensor,
        flip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = self.preprocessing.input_size
        out = resample(images, boxes, sizes, offsets, size, self.preprocessing.interpolation, flip)
        return self.steps.from_255(out.clamp_(0, 255))
