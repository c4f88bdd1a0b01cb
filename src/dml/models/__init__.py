"""Models: backbones, embedding heads and the Lightning module that trains them."""

from dml.models.backbones import SmallCNN, TimmBackbone
from dml.models.heads import LinearHead
from dml.models.module import DMLModule

__all__ = ["DMLModule", "LinearHead", "SmallCNN", "TimmBackbone"]
