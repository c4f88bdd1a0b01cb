"""One reader per benchmark."""

from dml.data.datasets.mnist import MNISTDataModule
from dml.data.datasets.synthetic import SyntheticDataModule

__all__ = ["MNISTDataModule", "SyntheticDataModule"]
