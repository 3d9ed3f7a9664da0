"""Merge strategies: small configured objects whose ``merge_tensor`` is a pure function per tensor.

``Strategy.from_dict({"name": "ties", "density": 0.5})`` builds any of them by name.
"""

from lightning_merge.strategies.base import STRATEGIES, Strategy
from lightning_merge.strategies.linear import Breadcrumbs, Dare, Linear, TaskArithmetic, TaskVectorMerge, Ties

__all__ = [
    "STRATEGIES",
    "Breadcrumbs",
    "Dare",
    "Linear",
    "Strategy",
    "TaskArithmetic",
    "TaskVectorMerge",
    "Ties",
]
