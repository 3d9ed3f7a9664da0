"""What a strategy sees of a merge: the :class:`MergePlan` protocol, handed to :meth:`Strategy.prepare`.

It sits at the bottom of the strategies so that they import nothing from the engine: the engine's plan
(:class:`lightning_merge.engine.run.Plan`) implements it, and so can any test double or other driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from lightning_merge.files.safetensors import TensorSpec


@runtime_checkable
class MergePlan(Protocol):
    """What a merge will do: names, shapes, experts; tensors are read only on request.

    Attributes:
        names: the tensors that go through the strategy, in order.
        experts: the experts, in order (objects with ``name`` and ``float32(tensor_name)``).
        base: the base expert, or None.
        prepared: the strategy's :class:`~lightning_merge.strategies.Prepared` once the plan made it.
    """

    names: list[str]
    experts: Sequence[Any]
    base: Any
    prepared: Any  # the strategy's Prepared (strategies.base), or None before prepare

    @property
    def num_experts(self) -> int:
        """How many experts are merged."""
        ...

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of the output tensor ``name``."""
        ...

    def passes(self, desc: str) -> Iterator[str]:
        """The merged tensors' names for a first pass over the model (one process only)."""
        ...

    def map(self, fn: Callable[[str], Any], desc: str) -> dict[str, Any]:
        """``{name: fn(name)}`` for every merged tensor, in plan order, split over ranks where the merge is."""
        ...

    def sum(self, fn: Callable[[str], Tensor], desc: str, zero: Tensor) -> Tensor:
        """Σ over the merged tensors of ``fn(name)`` (integer tensors: exact in any order)."""
        ...

    def base_tensor(self, name: str, rows: tuple[int, int] | None = None) -> Tensor | None:
        """The base's tensor (or its ``rows``) in float32 (None without a base or where the base lacks it)."""
        ...

    def expert_tensors(self, name: str, base: Tensor | None = None,
                       rows: tuple[int, int] | None = None) -> list[Tensor]:
        """Every expert's tensor (or its ``rows``) in float32."""
        ...

    def task_vectors(self, name: str) -> Tensor:
        """Stacked task vectors ``(N, *shape)`` in float32 (needs a base)."""
        ...

    def stats(self, name: str, rows: tuple[int, int] | None = None) -> list[dict[str, Tensor]]:
        """Every expert's merge-ready statistics for tensor ``name`` (or their ``rows``)."""
        ...

    def statistics(self, name: str, kind: str, rows: tuple[int, int] | None = None) -> list[Tensor]:
        """Every expert's merge-ready statistic of ``kind`` for tensor ``name`` (or its ``rows``)."""
        ...


__all__ = ["MergePlan"]
