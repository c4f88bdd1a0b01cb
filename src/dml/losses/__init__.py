"""Loss terms and miners.

A loss term is called as ``term(embeddings, labels) -> scalar``; pair and triplet losses also take a
miner's ``indices``. ``CompositeLoss`` sums weighted terms that share one proxy bank.
"""

from dml.functional import coding_rate
from dml.losses.antico import AntiCoLoss
from dml.losses.composite import CompositeLoss, Term
from dml.losses.miners import (
    DistanceWeightedMiner,
    EasyPositiveMiner,
    Miner,
    MultiSimilarityMiner,
    RandomTripletMiner,
    SemiHardNegativeMiner,
)
from dml.losses.pair import ContrastiveLoss, MarginLoss, MultiSimilarityLoss, TripletLoss
from dml.losses.proxy import ProxyAnchorLoss, ProxyBank, ProxyNCALoss

__all__ = [
    "AntiCoLoss",
    "CompositeLoss",
    "ContrastiveLoss",
    "DistanceWeightedMiner",
    "EasyPositiveMiner",
    "MarginLoss",
    "Miner",
    "MultiSimilarityLoss",
    "MultiSimilarityMiner",
    "ProxyAnchorLoss",
    "ProxyBank",
    "ProxyNCALoss",
    "RandomTripletMiner",
    "SemiHardNegativeMiner",
    "Term",
    "TripletLoss",
    "coding_rate",
]
