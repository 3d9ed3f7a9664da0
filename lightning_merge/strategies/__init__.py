"""Merge strategies: immutable configured objects that declare what they are (docs/design.md, "The strategy
contract"); ``prepare(plan)`` returns a :class:`Prepared` whose ``merge_tensor`` is a pure function per tensor.

``Strategy.from_dict({"name": "ties", "density": 0.5})`` builds any of them by name (the registry,
:mod:`lightning_merge.strategies.registry`, also gives each one's published reference).
"""

from lightning_merge.strategies.anchored import ArceeFusion, ModelStock, NearSwap
from lightning_merge.strategies.base import (
    ContinualForm,
    ContinualSummary,
    FoldContext,
    LinearForm,
    NoContinualForm,
    Prepared,
    Strategy,
)
from lightning_merge.strategies.cabs import Cabs
from lightning_merge.strategies.cat import CATMerging
from lightning_merge.strategies.consensus import Consensus
from lightning_merge.strategies.curvature import OTA, Fisher, WeightedMedian
from lightning_merge.strategies.della import Della
from lightning_merge.strategies.doge import DogeTA
from lightning_merge.strategies.dop import DOP
from lightning_merge.strategies.generalized import Generalized
from lightning_merge.strategies.isotropic import IsoC, IsoCTS
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic
from lightning_merge.strategies.linear import Linear
from lightning_merge.strategies.lines import LiNeS, LiNeSPrepared
from lightning_merge.strategies.opcm import OPCM
from lightning_merge.strategies.pcb import PCB
from lightning_merge.strategies.per_tensor import PerTensor
from lightning_merge.strategies.plan import MergePlan
from lightning_merge.strategies.ram import RAM, RAMPlusTL
from lightning_merge.strategies.registry import STRATEGIES, Reference
from lightning_merge.strategies.regmean import RegMean
from lightning_merge.strategies.sce import SCE
from lightning_merge.strategies.sparsify import SPARSIFIERS, Sparsification
from lightning_merge.strategies.spherical import Karcher, MultiSlerp, NuSlerp, Slerp
from lightning_merge.strategies.task_vectors import Breadcrumbs, Dare, TaskArithmetic, TaskVectorMerge, Ties
from lightning_merge.strategies.tsv import TSVMerge
from lightning_merge.strategies.widen import WIDEN
from lightning_merge.strategies.wudi import WUDI

__all__ = [
    "SPARSIFIERS",
    "STRATEGIES",
    "DOP",
    "OPCM",
    "OTA",
    "PCB",
    "ArceeFusion",
    "Breadcrumbs",
    "CATMerging",
    "Cabs",
    "Consensus",
    "ContinualForm",
    "ContinualSummary",
    "Dare",
    "Della",
    "DogeTA",
    "Fisher",
    "FoldContext",
    "Generalized",
    "IsoC",
    "IsoCTS",
    "Karcher",
    "LayerwiseTaskArithmetic",
    "LiNeS",
    "LiNeSPrepared",
    "Linear",
    "LinearForm",
    "MergePlan",
    "ModelStock",
    "MultiSlerp",
    "NearSwap",
    "NoContinualForm",
    "NuSlerp",
    "PerTensor",
    "Prepared",
    "RAM",
    "RAMPlusTL",
    "Reference",
    "RegMean",
    "SCE",
    "Slerp",
    "Sparsification",
    "Strategy",
    "TSVMerge",
    "TaskArithmetic",
    "TaskVectorMerge",
    "Ties",
    "WIDEN",
    "WUDI",
    "WeightedMedian",
]
