"""lightning-merge: capture curvature while you fine-tune with Lightning, merge experts with it.

The public API is short: :func:`merge`, :class:`Expert`, the strategies in :mod:`lightning_merge.strategies`,
:class:`ContinualState`, and the callbacks in :mod:`lightning_merge.callbacks` (imported lazily: importing this
package does not import Lightning).
"""

from lightning_merge._version import __version__
from lightning_merge.coefficients import QuadraticChoice, quadratic_coefficients
from lightning_merge.continual import ContinualState
from lightning_merge.diagnostics import Report, report
from lightning_merge.engine import MergePlan, merge, prepare
from lightning_merge.experts import Expert, TensorSpec
from lightning_merge.ownership import ForeignOutput, IncompleteOutput
from lightning_merge.stats import Statistics, StatisticsError
from lightning_merge.strategies import (
    OPCM,
    OTA,
    PCB,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Fisher,
    Generalized,
    LayerwiseTaskArithmetic,
    Linear,
    LinearForm,
    LiNeS,
    Prepared,
    RegMean,
    Strategy,
    TaskArithmetic,
    Ties,
    TSVMerge,
    WeightedMedian,
)

__all__ = [
    "Breadcrumbs",
    "Cabs",
    "Consensus",
    "ContinualState",
    "Dare",
    "Expert",
    "Fisher",
    "ForeignOutput",
    "Generalized",
    "IncompleteOutput",
    "LayerwiseTaskArithmetic",
    "LiNeS",
    "Linear",
    "LinearForm",
    "MergePlan",
    "OPCM",
    "OTA",
    "PCB",
    "Prepared",
    "QuadraticChoice",
    "RegMean",
    "Report",
    "Statistics",
    "StatisticsError",
    "Strategy",
    "TSVMerge",
    "TaskArithmetic",
    "TensorSpec",
    "Ties",
    "WeightedMedian",
    "__version__",
    "merge",
    "prepare",
    "quadratic_coefficients",
    "report",
]
