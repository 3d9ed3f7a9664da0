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


#: a first pass reads a statistic in row chunks of at most this many bytes per expert (not the tensor whole)
CHUNK_BYTES = 16 << 20


def row_chunks(shape: tuple[int, ...] | Any) -> list[tuple[int, int] | None]:
    """The row ranges a first pass reads a tensor of ``shape`` in: ``[None]`` (whole) for a small or 0-/1-row
    tensor, else consecutive ``(start, stop)`` ranges of at most :data:`CHUNK_BYTES` of float32 each."""
    shape = tuple(shape)
    if len(shape) < 2 or math.prod(shape) * 4 <= CHUNK_BYTES:
        return [None]
    per_row = math.prod(shape[1:]) * 4
    step = max(1, CHUNK_BYTES // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def _row_squares(value: Tensor) -> list[float]:
    """Σ x² of each row of ``value`` (its first axis; a 0-/1-D tensor is one row), in float64. A row's sum is the
    same whether the row is read alone, in a chunk or in the whole tensor; the rows' sums are then added exactly
    (``math.fsum``), so a norm does not depend on how a pass was split (chunks, ranks, batch or continual)."""
    rows = value.shape[0] if value.dim() > 1 else 1
    return value.double().square().reshape(rows, -1).sum(1).tolist()


def _add_squares(into: tuple[list[float], list[float]], index: int, value: Tensor,
                 precision: Precision | None) -> None:
    """Append the per-row Σ F² of a statistic's rows and Σ P² of the precision derived from them to ``into``."""
    squares = _row_squares(value)
    into[0].extend(squares)
    into[1].extend(squares if precision is None else _row_squares(precision(index, value)))


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
    def per_tensor(name: str) -> list[tuple[list[float], list[float]]]:
        out: list[tuple[list[float], list[float]]] = [([], []) for _ in range(plan.num_experts)]
        for rows in row_chunks(plan.spec(name).shape):  # every expert's rows of a chunk, then the next chunk
            for i, value in enumerate(plan.statistics(name, kind, rows)):
                _add_squares(out[i], i, value, precision)
        return out

    parts = plan.map(per_tensor, f"{kind} norms")
    raw: list[list[float]] = [[] for _ in range(plan.num_experts)]
    squares: list[list[float]] = [[] for _ in range(plan.num_experts)]
    for per_expert in parts.values():
        for i, (r, value) in enumerate(per_expert):
            raw[i].extend(r)
            squares[i].extend(value)
    for i, r in enumerate(raw):
        _refuse_zero(plan.experts[i].name, kind, math.fsum(r), remedy)
    return [math.sqrt(math.fsum(s)) for s in squares]


def expert_norm(expert: Any, names: Sequence[str], kind: str, precision: Precision | None = None, index: int = 0,
                remedy: str = "merge without normalize") -> float:
    """One expert's norm of its statistic ``kind`` (or of ``precision(index, F)``) over ``names``: the continual
    counterpart of :func:`model_norms`, with the same refusal of a statistic that is zero everywhere."""
    sums: tuple[list[float], list[float]] = ([], [])
    for n in names:
        for rows in row_chunks(expert.spec(n).shape):
            _add_squares(sums, index, expert.statistic(n, kind, rows=rows), precision)
    _refuse_zero(expert.name, kind, math.fsum(sums[0]), remedy)
    return math.sqrt(math.fsum(sums[1]))


__all__ = ["CHUNK_BYTES", "TINY", "Precision", "expert_norm", "model_norms", "row_chunks"]
