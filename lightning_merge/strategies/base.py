"""The Strategy contract: a small, serialisable object whose ``merge_tensor`` is a pure function per tensor."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_merge.engine import MergePlan

STRATEGIES: dict[str, type[Strategy]] = {}


@dataclasses.dataclass
class Strategy:
    """Base class of every merge strategy.

    A strategy is configured in ``__init__`` (typed keyword arguments, validated) and merges one tensor at a time
    in :meth:`merge_tensor`; the engine does everything else (reading, dtype, threads, writing). Subclasses are
    dataclasses, so :meth:`to_dict` / :meth:`from_dict` round-trip through plain values (recipes, ``--set``,
    LightningCLI, the continual journal).

    Class attributes:
        name: the name used in recipes and ``to_dict()`` (``"ties"``, ``"fisher"``...).
        requires: statistic kinds the strategy reads for every expert (``"fisher"``, ``"exp_avg_sq"``).
        needs_base: whether a base model is required.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_base: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            STRATEGIES[cls.name] = cls

    # -- the contract -------------------------------------------------------------------------------------------
    def prepare(self, plan: MergePlan) -> None:
        """Optional first pass for global quantities; the default checks per-expert argument lengths.

        Args:
            plan: what will be merged: tensor names, shapes, the experts; reads only what is asked for.
        """
        self._check_per_expert(plan.num_experts)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        """Merge one tensor.

        Args:
            name: the tensor's name (after any prefix was stripped).
            base: the base model's tensor in float32, or None when there is no base.
            tensors: the experts' tensors in float32, in expert order.
            stats: ``stats[i]`` maps each kind in :attr:`requires` to expert ``i``'s float32 statistic.

        Returns:
            The merged tensor in float32, of the same shape.
        """
        raise NotImplementedError

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-value description: ``{"name": ..., **arguments}``; ``Strategy.from_dict`` rebuilds it."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"name": self.name, **values}

    @staticmethod
    def from_dict(spec: Mapping[str, Any]) -> Strategy:
        """Build a strategy from ``{"name": ..., **arguments}`` (the output of :meth:`to_dict`).

        Raises:
            ValueError: unknown name or argument, naming the valid ones.
        """
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
        cls = STRATEGIES[name]
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ValueError(
                f"strategy {name!r} has no argument {', '.join(map(repr, unknown))}; "
                f"its arguments are: {', '.join(sorted(valid)) or '(none)'}"
            )
        return cls(**spec)

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    def _per_expert_fields(self) -> tuple[str, ...]:
        """Names of arguments that may be a list with one value per expert."""
        return ()

    def _check_per_expert(self, num_experts: int) -> None:
        for field in self._per_expert_fields():
            value = getattr(self, field)
            if isinstance(value, (list, tuple)) and len(value) != num_experts:
                raise ValueError(
                    f"{type(self).__name__}.{field} has {len(value)} values but {num_experts} experts are merged; "
                    f"give one value per expert or a single number"
                )

    def _per_expert(self, field: str, index: int, default: float) -> float:
        value = getattr(self, field)
        if value is None:
            return default
        if isinstance(value, (list, tuple)):
            return float(value[index])
        return float(value)

    def _weights(self, n: int) -> Tensor:
        return torch.tensor([self._per_expert("weights", i, 1.0) for i in range(n)], dtype=torch.float32)


def check_number(owner: str, field: str, value: Any, *, low: float | None = None, high: float | None = None,
                 per_expert: bool = False) -> None:
    """Validate a number (or a list of numbers when ``per_expert``) against an inclusive range."""
    values = value if per_expert and isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = "a number or a list of numbers" if per_expert else "a number"
            raise ValueError(f"{owner}.{field} must be {kind}, got {value!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ValueError(f"{owner}.{field} must be in [{lo}, {hi}], got {v!r}")


def check_choice(owner: str, field: str, value: Any, choices: Sequence[Any]) -> None:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")
