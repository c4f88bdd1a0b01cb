"""Data: benchmark readers, class-disjoint splits and class-balanced sampling."""

from dml.data.datamodule import RetrievalDataModule, RetrievalSplit
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
