"""One reader per benchmark."""

from dml.data.datasets.cars import CarsDataModule
from dml.data.datasets.cub import CUBDataModule
from dml.data.datasets.folder import FolderDataModule
from dml.data.datasets.inshop import InShopDataModule
from dml.data.datasets.mnist import MNISTDataModule
from dml.data.datasets.omniglot import OmniglotDataModule
from dml.data.datasets.sop import SOPDataModule
from dml.data.datasets.synthetic import SyntheticDataModule
from dml.data.datasets.table import TableDataModule

__all__ = [
    "CUBDataModule",
    "CarsDataModule",
    "FolderDataModule",
    "InShopDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "SOPDataModule",
    "SyntheticDataModule",
    "TableDataModule",
]
