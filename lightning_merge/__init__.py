"""lightning-merge: capture curvature while you fine-tune with Lightning, merge experts with it.

The public API is short: :func:`merge`, :class:`Expert`, the strategies in :mod:`lightning_merge.strategies`,
and the callbacks in :mod:`lightning_merge.callbacks` (imported lazily: importing this package does not import
Lightning).
"""

from lightning_merge.continual import ContinualState
from lightning_merge.engine import MergePlan, merge
from lightning_merge.experts import Expert, TensorSpec
from lightning_merge.stats import Statistics, StatisticsError
from lightning_merge.strategies import (
    OPCM,
    OTA,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Fisher,
    Generalized,
    Linear,
    LiNeS,
    Strategy,
    TaskArithmetic,
    Ties,
    WeightedMedian,
)

__version__ = "0.1.0"

__all__ = [
    "Breadcrumbs",
    "Cabs",
    "Consensus",
    "ContinualState",
    "Dare",
    "Expert",
    "Fisher",
    "Generalized",
    "LiNeS",
    "Linear",
    "MergePlan",
    "OPCM",
    "OTA",
    "Statistics",
    "StatisticsError",
    "Strategy",
    "TaskArithmetic",
    "TensorSpec",
    "Ties",
    "WeightedMedian",
    "__version__",
    "merge",
]
