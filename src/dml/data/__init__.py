"""Data: benchmark readers, class-disjoint splits and class-balanced sampling."""

from dml.data.datamodule import RetrievalDataModule, RetrievalSplit
from dml.data.datasets import MNISTDataModule, SyntheticDataModule
from dml.data.samplers import ClassBalancedBatchSampler

__all__ = [
    "ClassBalancedBatchSampler",
    "MNISTDataModule",
    "RetrievalDataModule",
    "RetrievalSplit",
    "SyntheticDataModule",
]
