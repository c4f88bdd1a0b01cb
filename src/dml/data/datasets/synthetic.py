"""Synthetic images whose classes each have several visual modes: fast tests with real code paths.

Every (class, mode) pair has its own smooth random colour template; an image is its template, shifted by a
few pixels, plus noise. Modes of one class look unrelated, as the sub-clusters that EPS is built for.
Training classes and test classes are disjoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from dml.data.datamodule import RetrievalDataModule
from dml.data.datasets.tensor_source import TensorSource
from dml.data.fast_path import EncodedTensors
from dml.data.preprocessing import Preprocessing
from dml.data.splits import ImageSource, RawSplit
from dml.errors import UserError


def make_synthetic(
    num_classes: int,
    modes_per_class: int,
    images_per_mode: int,
    image_size: int,
    channels: int,
    noise: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) uint8 images and (N,) class ids, N = num_classes * modes_per_class * images_per_mode."""
    g = torch.Generator().manual_seed(seed)
    n_templates = num_classes * modes_per_class
    coarse = torch.rand(n_templates, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    which = torch.arange(n_templates).repeat_interleave(images_per_mode)
    images = templates[which]
    shifts = torch.randint(-2, 3, (len(which), 2), generator=g)
    images = torch.stack(
        [
            torch.roll(img, (int(dy), int(dx)), dims=(1, 2))
            for img, (dy, dx) in zip(images, shifts, strict=True)
        ]
    )
    images = images + noise * torch.randn(images.shape, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, which // modes_per_class


class SyntheticDataModule(RetrievalDataModule):
    """Generated multi-mode classes: ``train_classes`` for training, ``test_classes`` other ones for testing.

    Args:
        train_classes, test_classes: how many classes to generate for each side.
        modes_per_class, images_per_mode, image_size, channels, noise: the generator's settings.
        data_seed: seed of the generator (the data stay fixed when the training seed changes).
        **kwargs: see :class:`RetrievalDataModule`.
    """

    name = "synthetic"
    has_fast_path = True  # its images JPEG-encoded in memory (quality 95), to test the fast path on CPU
    channel_choices = (1, 3)

    def __init__(
        self,
        train_classes: int = 6,
        test_classes: int = 6,
        modes_per_class: int = 3,
        images_per_mode: int = 10,
        image_size: int = 32,
        channels: int = 3,
        noise: float = 0.1,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if train_classes < 1 or test_classes < 1:
            raise UserError(
                f"dataset.train_classes and dataset.test_classes must be >= 1, got {train_classes}, {test_classes}"
            )
        self.train_classes = train_classes
        self.gen: dict[str, Any] = dict(
            num_classes=train_classes + test_classes,
            modes_per_class=modes_per_class,
            images_per_mode=images_per_mode,
            image_size=image_size,
            channels=channels,
            noise=noise,
            seed=data_seed,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of its images."""
        return (self.gen["channels"], self.gen["image_size"], self.gen["image_size"])

    def load_raw(self) -> dict[str, RawSplit]:
        images, labels = make_synthetic(**self.gen)
        train = labels < self.train_classes
        return {
            "train": RawSplit(TensorSource(images[train].contiguous()), labels[train]),
            "test": RawSplit(TensorSource(images[~train].contiguous()), labels[~train]),
        }

    def preprocessing(self) -> Preprocessing:
        """Its images as they are (a file is resized to them), normalised with mean 0.5 and std 0.25; no
        augmentation."""
        channels, size = self.gen["channels"], self.gen["image_size"]
        return Preprocessing(
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            resize=(size, size),
            color="L" if channels == 1 else "RGB",
            channels=channels,
            hflip=False,
            random_crop=False,
        )

    def transform(self, stage: str) -> Callable:
        return self.preprocessing().tensor_transform()

    def encoded(self, source: ImageSource) -> ImageSource:
        if self.gen["channels"] != 3:
            raise UserError(
                f"dataset.pipeline=fast decodes RGB images: set dataset.channels=3, not {self.gen['channels']}"
            )
        return EncodedTensors(cast(TensorSource, source).images)  # the source load_raw made
