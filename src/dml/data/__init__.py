"""Data: benchmark readers, class-disjoint splits and class-balanced sampling."""

from dml.data.datamodule import RetrievalDataModule
from dml.data.datasets import (
    CarsDataModule,
    CUBDataModule,
    FolderDataModule,
    InShopDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    SOPDataModule,
    SyntheticDataModule,
    TableDataModule,
)
from dml.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dml.data.splits import RetrievalSplit

__all__ = [
    "CUBDataModule",
    "CarsDataModule",
    "ClassBalancedBatchSampler",
    "FolderDataModule",
    "InShopDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "RandomBatchSampler",
    "RetrievalDataModule",
    "RetrievalSplit",
    "SOPDataModule",
    "SyntheticDataModule",
    "TableDataModule",
]
