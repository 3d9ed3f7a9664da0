"""Merge strategies: small configured objects whose ``merge_tensor`` is a pure function per tensor.

``Strategy.from_dict({"name": "ties", "density": 0.5})`` builds any of them by name.
"""

from lightning_merge.strategies.base import STRATEGIES, Strategy
from lightning_merge.strategies.composed import Cabs, Consensus, Generalized, LiNeS
from lightning_merge.strategies.continual import OPCM
from lightning_merge.strategies.curvature import OTA, Fisher, WeightedMedian
from lightning_merge.strategies.linear import Breadcrumbs, Dare, Linear, TaskArithmetic, TaskVectorMerge, Ties

__all__ = [
    "STRATEGIES",
    "Breadcrumbs",
    "Cabs",
    "Consensus",
    "Dare",
    "Fisher",
    "Generalized",
    "LiNeS",
    "Linear",
    "OPCM",
    "OTA",
    "Strategy",
    "TaskArithmetic",
    "TaskVectorMerge",
    "Ties",
    "WeightedMedian",
]
