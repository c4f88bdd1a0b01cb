"""Data: benchmark readers, class-disjoint splits and class-balanced sampling."""

from dml.data.datamodule import RetrievalDataModule
from dml.data.datasets import (
    CarsDataModule,
    CUBDataModule,
    InShopDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    SOPDataModule,
    SyntheticDataModule,
)
from dml.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dml.data.splits import RetrievalSplit

__all__ = [
    "CUBDataModule",
    "CarsDataModule",
    "ClassBalancedBatchSampler",
    "InShopDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "RandomBatchSampler",
    "RetrievalDataModule",
    "RetrievalSplit",
    "SOPDataModule",
    "SyntheticDataModule",
]
