"""Whether a module's parameters are sharded across ranks, and how: the one place the capture asks, by type (never by
a class name). What each answer means for the statistics:

- ``"fsdp1"``: ``FullyShardedDataParallel`` (Lightning's ``FSDPStrategy``): each rank holds shards of flattened
  parameters and sees gradient shards; the optimizer state Lightning gathers for a checkpoint is the full state,
  keyed by index in the order of the module's parameters.
- ``"fsdp2"``: ``fully_shard`` (an ``FSDPModule``, e.g. under Lightning's ``ModelParallelStrategy``): the parameters,
  their gradients and the optimizer state are ``DTensor`` shards (dim 0 across the mesh).
- ``"dtensor"``: ``DTensor`` parameters without ``fully_shard`` (tensor parallelism through ``parallelize_module``).
- None: each rank holds every parameter whole (one process, DDP).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Literal

import torch
from torch import nn

Sharding = Literal["fsdp1", "fsdp2", "dtensor"]
DTENSOR_SHARDINGS: tuple[Sharding, ...] = ("fsdp2", "dtensor")  # parameters, gradients, Adam's state: DTensor shards


@functools.cache
def _fsdp_types() -> tuple[type | None, type | None, type | None]:
    """``(FullyShardedDataParallel, FSDPModule, DTensor)`` of this torch (None where it has no such type)."""
    if not torch.distributed.is_available():
        return None, None, None
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4, 2.5
        except ImportError:
            FSDPModule = None  # noqa: N806 - a class
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:
        from torch.distributed._tensor import DTensor  # torch 2.4
    return FullyShardedDataParallel, FSDPModule, DTensor


def _lightning_fsdp(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``FSDPStrategy`` (or a subclass): it wraps the module in FSDP1."""
    if strategy is None or "lightning.pytorch" not in sys.modules:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


DEEPSPEED_REFUSAL = (
    "CurvatureCapture does not support DeepSpeedStrategy: ZeRO keeps Adam's state and the gradients in flat partitions "
    "that do not map to named parameters here, and no DeepSpeed run can be tested on this project's machines (it "
    "needs CUDA). Shard with FSDP2 instead (ModelParallelStrategy and torch.distributed.fsdp.fully_shard in "
    "configure_model, supported), or DDP. To merge DeepSpeed checkpoints, consolidate each with the zero_to_fp32.py "
    "script DeepSpeed writes into the checkpoint folder and pass the consolidated file as an Expert"
)


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy`` (or a subclass), told by class name so that the
    ``deepspeed`` package need not be importable."""
    return any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__)


def sharding(module: nn.Module, strategy: Any = None) -> Sharding | None:
    """How ``module``'s parameters are sharded across ranks (see the module's docstring), or None when they are not.

    Args:
        module: the module trained (a LightningModule, or any ``nn.Module``).
        strategy: the Trainer's strategy, if any: Lightning's ``FSDPStrategy`` wraps ``module`` from outside, so
            the module alone does not show it.

    Returns:
        ``"fsdp1"``, ``"fsdp2"``, ``"dtensor"`` or None.
    """
    if _lightning_fsdp(strategy):
        return "fsdp1"
    fsdp1, fsdp2, dtensor = _fsdp_types()
    if fsdp1 is None:
        return None
    modules = list(module.modules())
    if any(isinstance(m, fsdp1) for m in modules):
        return "fsdp1"
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in modules):
        return "fsdp2"
    if any(isinstance(p, dtensor) for p in module.parameters()):
        return "dtensor"
    return None


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a tensor distributed over ranks: FSDP2, tensor parallelism)."""
    dtensor = _fsdp_types()[2]
    return dtensor is not None and isinstance(tensor, dtensor)


def holds_dtensors(module: nn.Module, strategy: Any = None) -> bool:
    """Whether ``module``'s parameters are ``DTensor`` shards (:func:`sharding` is ``"fsdp2"`` or ``"dtensor"``): the
    capture then works on the shards (:mod:`lightning_merge.capture.sharded`)."""
    return sharding(module, strategy) in DTENSOR_SHARDINGS


__all__ = ["DTENSOR_SHARDINGS", "Sharding", "holds_dtensors", "is_dtensor", "sharding"]
