"""Models: backbones, embedding heads and the Lightning module that trains them."""

from dml.models.backbones import GoogLeNet, SmallCNN, TimmBackbone
from dml.models.bn_inception import BNInception
from dml.models.heads import LinearHead
from dml.models.module import DMLModule

__all__ = ["BNInception", "DMLModule", "GoogLeNet", "LinearHead", "SmallCNN", "TimmBackbone"]
