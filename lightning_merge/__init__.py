"""lightning-merge: capture curvature while you fine-tune with Lightning, merge experts with it.

The public API is short: :func:`merge`, :class:`Expert`, the strategies in :mod:`lightning_merge.strategies`,
:class:`ContinualState`, and the callbacks in :mod:`lightning_merge.callbacks` (imported lazily: importing this
package does not import Lightning).
"""

from lightning_merge import moved
from lightning_merge._version import __version__
from lightning_merge.continual.state import ContinualState
from lightning_merge.engine.run import merge, prepare
from lightning_merge.errors import ForeignOutput, IncompleteOutput, LightningMergeError, StatisticsError
from lightning_merge.formats.sidecar import Statistics
from lightning_merge.sources.expert import Expert
from lightning_merge.sources.expert import TensorSpec as TensorSpec
from lightning_merge.strategies import (
    DOP,
    OPCM,
    OTA,
    PCB,
    WIDEN,
    WUDI,
    ArceeFusion,
    Breadcrumbs,
    Cabs,
    CATMerging,
    Consensus,
    Dare,
    DogeTA,
    Fisher,
    Generalized,
    IsoC,
    IsoCTS,
    Karcher,
    LayerwiseTaskArithmetic,
    Linear,
    LiNeS,
    ModelStock,
    MultiSlerp,
    NearSwap,
    NuSlerp,
    RegMean,
    Slerp,
    Strategy,
    TaskArithmetic,
    Ties,
    TSVMerge,
    WeightedMedian,
)
from lightning_merge.strategies import (
    LinearForm as LinearForm,
)
from lightning_merge.strategies import (
    Prepared as Prepared,
)
from lightning_merge.strategies.plan import MergePlan as MergePlan
from lightning_merge.tools.coefficients import QuadraticChoice, quadratic_coefficients
from lightning_merge.tools.diagnostics import Report, report

moved.install()

# The features: merging, experts, strategies, continual merging, statistics, diagnostics, the errors to catch.
# The contract's building blocks (MergePlan, Prepared, LinearForm, TensorSpec) stay importable from here but live in
# lightning_merge.strategies (a strategy's author imports them there).
__all__ = [
    "ArceeFusion",
    "Breadcrumbs",
    "CATMerging",
    "Cabs",
    "Consensus",
    "ContinualState",
    "Dare",
    "DogeTA",
    "Expert",
    "Fisher",
    "ForeignOutput",
    "Generalized",
    "IncompleteOutput",
    "IsoC",
    "IsoCTS",
    "Karcher",
    "LayerwiseTaskArithmetic",
    "LiNeS",
    "LightningMergeError",
    "Linear",
    "ModelStock",
    "MultiSlerp",
    "NearSwap",
    "NuSlerp",
    "DOP",
    "OPCM",
    "OTA",
    "PCB",
    "QuadraticChoice",
    "RegMean",
    "Report",
    "Slerp",
    "Statistics",
    "StatisticsError",
    "Strategy",
    "TSVMerge",
    "TaskArithmetic",
    "Ties",
    "WIDEN",
    "WUDI",
    "WeightedMedian",
    "__version__",
    "merge",
    "prepare",
    "quadratic_coefficients",
    "report",
]
