"""Model-wide norms of the experts' statistics, for strategies that normalise each expert's weight by its
statistic's norm (Fisher merging's ``normalize``, ``weighting="fisher"``, the weighted median's ``normalize``): the
batch merge's first pass (:func:`model_norms`) and the continual form's per-expert counterpart (:func:`expert_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.formats.sidecar import StatisticsError

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

#: the smallest positive float32: a norm divided by is at least this
TINY = torch.finfo(torch.float32).tiny


#: an expert's elementwise weight derived from its statistic: ``precision(index, statistic)`` (a new tensor)
Precision = Callable[[int, Tensor], Tensor]


def _squares(index: int, value: Tensor, precision: Precision | None) -> tuple[float, float]:
    """Σ F² of one statistic tensor and Σ P² of the precision derived from it (in float64)."""
    raw = float(value.double().square().sum())
    return raw, raw if precision is None else float(precision(index, value).double().square().sum())


def _refuse_zero(expert: str, kind: str, raw: float, remedy: str) -> None:
    if raw == 0.0:
        raise StatisticsError(
            f"expert '{expert}' has a {kind!r} statistic that is zero on every merged tensor: normalising its weight "
            f"by that statistic's norm is undefined (it would take all the weight, or none). Its capture recorded no "
            f"gradient (frozen parameters? a loss without gradient?): capture it again or leave it out, or {remedy}"
        )


def model_norms(plan: MergePlan, kind: str, precision: Precision | None = None,
                remedy: str = "merge without normalize") -> list[float]:
    """Per expert, the L2 norm over every merged tensor of its statistic ``kind``, or of ``precision(i, F)``: the
    elementwise weight a strategy derives from it (Fisher merging's floored F̃ = max(F, floor) + eps). Normalising by
    the norm of the weight actually used keeps the floor and the normalisation consistent: a Fisher that lies below
    the floor almost everywhere is then an expert of uniform weight, not one whose tiny norm gives it all the weight.
    Reads statistics only.

    Raises:
        StatisticsError: an expert whose statistic is zero on every merged tensor (its normalisation is undefined);
            ``remedy`` ends the message.
    """
    parts = plan.map(lambda name: [_squares(i, v, precision) for i, v in enumerate(plan.statistics(name, kind))],
                     f"{kind} norms")
    raw = [0.0] * plan.num_experts
    squares = [0.0] * plan.num_experts
    for per_expert in parts.values():  # in plan order: one process's floats, however the pass was split
        for i, (r, value) in enumerate(per_expert):
            raw[i] += r
            squares[i] += value
    for i, r in enumerate(raw):
        _refuse_zero(plan.experts[i].name, kind, r, remedy)
    return [math.sqrt(s) for s in squares]


def expert_norm(expert: Any, names: Sequence[str], kind: str, precision: Precision | None = None, index: int = 0,
                remedy: str = "merge without normalize") -> float:
    """One expert's norm of its statistic ``kind`` (or of ``precision(index, F)``) over ``names``: the continual
    counterpart of :func:`model_norms`, with the same refusal of a statistic that is zero everywhere."""
    raw = squares = 0.0
    for n in names:
        r, value = _squares(index, expert.statistic(n, kind), precision)
        raw += r
        squares += value
    _refuse_zero(expert.name, kind, raw, remedy)
    return math.sqrt(squares)


__all__ = ["TINY", "Precision", "expert_norm", "model_norms"]
