"""Weighted average of the experts (:class:`Linear`), and the linear combinations both it and the task-vector
family (:mod:`lightning_merge.strategies.task_vectors`) are built from: coefficients, the normalising sum, and the
running sums of their continual forms."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import (
    ContinualForm,
    ContinualSummary,
    FoldContext,
    LinearForm,
    Prepared,
    Strategy,
)
from lightning_merge.strategies.checks import Owner, PerExpert, check_number, normalizing_sum
from lightning_merge.strategies.registry import MERGEKIT, Reference


def _linear_coefficients(owner: Owner, weights: list[float], normalize: bool, scale: float = 1.0) -> list[float]:
    """cᵢ = scale·wᵢ, divided by Σw when normalising (weights that sum to 0 are refused, as at construction)."""
    divisor = normalizing_sum(owner, weights) if normalize else 1.0
    return [scale * w / divisor for w in weights]


def _check_weight_sum(owner: Owner, weights: PerExpert) -> None:
    """A normalised weighted average of weights that sum to 0 is undefined: refused when the strategy is built (a
    single number w stands for one w per expert, whose sum is 0 only when w is)."""
    if weights is not None:
        many = isinstance(weights, (list, tuple))
        normalizing_sum(owner, list(weights) if many else [weights],
                        "weights" if many else "weights (one value for every expert)")


@dataclasses.dataclass(frozen=True)
class Linear(Strategy):
    """Weighted average of the experts: ``θ = Σ λᵢθᵢ / Σ λᵢ`` (or ``Σ λᵢθᵢ`` without normalisation).

    Needs no base (a base, if given, is not read).

    Args:
        weights: one weight per expert, or None for uniform weights.
        normalize: divide by the sum of the weights.
    """

    name = "linear"
    reference = Reference("https://arxiv.org/abs/2203.05482",
                          ("https://github.com/mlfoundations/model-soups", MERGEKIT + "linear.py"))
    needs_base = False
    uses_base = False

    weights: PerExpert = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True)
        if self.normalize:
            _check_weight_sum(type(self), self.weights)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        return F.weighted_sum(list(tensors), torch.tensor(self.expert_weights(len(tensors))), self.normalize)

    row_local = True  # a weighted sum, entry by entry

    def working_set(self, num_experts: int) -> float:
        """The experts as read, one running sum, the result and its cast (measured: 6 copies for 3 experts)."""
        return num_experts + 4

    @property
    def linear(self) -> bool:
        return True

    def linear_form(self, num_experts: int, name: str | None = None, prepared: Prepared | None = None) -> LinearForm:
        return LinearForm(0.0, tuple(_linear_coefficients(type(self), self.expert_weights(num_experts),
                                                        self.normalize)))

    def continual_form(self) -> ContinualForm:
        return _LinearFold(self)


class _LinearFold(ContinualForm):
    """Σ wᵢτᵢ and Σ wᵢ: θ = θ₀ + Σwτ/Σw (normalised), or Σwᵢθᵢ = (Σw)θ₀ + Σwτ."""

    quantities = (("sum", torch.float32),)
    row_local = True

    def __init__(self, strategy: Linear):
        self.strategy = strategy

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        if self.strategy.normalize:  # the weights of the experts merged so far, this one included
            _prefix_sum(self.strategy, index)
        return FoldContext(index, self.strategy.per_expert("weights", index, 1.0))

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        return {"sum": _add_scaled(None if running is None else running["sum"], tau, ctx.weight)}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        if self.strategy.normalize:
            return running["sum"] / normalizing_sum(type(self.strategy), summary.weights) + base
        return base * sum(summary.weights) + running["sum"]


def _prefix_sum(strategy: Strategy, index: int) -> float:
    """Σw of experts 0..index, refused as a batch merge of them would be (a continual state's model after the add is
    their normalised average): the add is refused before any work."""
    weights = [strategy.per_expert("weights", i, 1.0) for i in range(index + 1)]
    try:
        return normalizing_sum(type(strategy), weights)
    except ValueError as err:
        raise ValueError(f"{err} (in a continual state the weights of the experts added so far, this one included, "
                         f"must not sum to 0)") from None


def _add_scaled(previous: Tensor | None, x: Tensor, weight: float) -> Tensor:
    """``previous + weight·x`` (``weight·x`` for the first), in the order :func:`F.weighted_sum` adds."""
    if previous is None:
        return x * weight
    return previous.add_(x, alpha=weight)


def __getattr__(name: str) -> Any:
    """The task-vector family lived here before 0.3: its names still import from this module, with a warning."""
    if name not in _TASK_VECTORS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.strategies.task_vectors", name)


_TASK_VECTORS = ("Breadcrumbs", "Dare", "ELECTIONS", "TaskArithmetic", "TaskVectorMerge", "Ties", "WEIGHTINGS")

__all__ = ["Linear"]
