"""LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025): any strategy's merged task vector scaled per
block, shallow blocks least. Rules: ALGORITHMS.md, "LiNeS"."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import (
    ContinualForm,
    ContinualSummary,
    FoldContext,
    LinearForm,
    NoContinualForm,
    Prepared,
    Strategy,
)
from lightning_merge.strategies.checks import check_number, set_field
from lightning_merge.strategies.registry import Reference
from lightning_merge.strategies.task_vectors import TaskArithmetic

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


class LiNeSPrepared(Prepared):
    """LiNeS bound to one merge: the α used (given, or the multi-task rule's) and the per-tensor factors."""

    @property
    def alpha(self) -> float:
        return self["alpha"]

    def layer_scale(self, name: str) -> float:
        """The factor applied to tensor ``name``'s merged task vector."""
        return self.strategy.layer_scale(name, self)


@dataclasses.dataclass(frozen=True)
class LiNeS(Strategy):
    """LiNeS: layer-increasing scaling of any strategy's merged task vector.

    The merged task vector of block l (0-based, of L) is scaled by ``alpha + beta · l/(L − 1)``: shallow layers,
    which hold general features, stay close to the base; deep layers keep more of the task-specific update.
    Tensors outside numbered blocks (embeddings, final norm) get ``alpha``. The block of a tensor is the first
    match of ``pattern`` in its name (``layers.3.mlp.weight`` → 3); ``L`` = 1 + the largest block index; with
    one block everything gets ``alpha``.

    Args:
        inner: the strategy whose merged task vector is scaled (a Strategy or its ``to_dict()``; None: task
            arithmetic, the paper's multi-task setting); its own ``scale`` applies first (leave it at 1).
        alpha: the scale of the shallowest block. None: the multi-task rule ``α = ‖Σᵢ τᵢ‖₁ / (N ‖τ_merged‖₁)``
            over the whole model (an extra pass that runs ``inner`` once at every tensor), which makes
            ``alpha · τ_merged`` as large as the average task vector. The value used is the prepared merge's
            ``alpha`` (``lightning_merge.prepare(experts, base, strategy).alpha``), and is recorded in the output's
            ``lightning_merge.json``.
        beta: the extra scale of the deepest block (tune on validation; 0 is uniform scaling).
        pattern: a regular expression with one group capturing the block index.
    """

    name = "lines"
    reference = Reference("https://arxiv.org/abs/2410.17146", ("https://github.com/wang-kee/LiNeS",))

    inner: Any = None
    alpha: float | None = None
    beta: float = 1.0
    pattern: str = F.BLOCK_PATTERN

    def __post_init__(self) -> None:
        inner = TaskArithmetic() if self.inner is None else self.inner
        if isinstance(inner, Mapping):
            inner = Strategy.from_dict(inner)
        if not isinstance(inner, Strategy) or isinstance(inner, LiNeS):
            raise ValueError(f"LiNeS.inner must be a strategy (or its to_dict()), e.g. LiNeS(TaskArithmetic()); "
                             f"got {self.inner!r}")
        set_field(self, "inner", inner)
        if self.alpha is not None:
            check_number(type(self), "alpha", self.alpha)
        check_number(type(self), "beta", self.beta)
        try:
            if re.compile(self.pattern).groups != 1:
                raise ValueError
        except (re.error, ValueError, TypeError):
            raise ValueError(f"LiNeS.pattern must be a regular expression with exactly one group capturing the "
                             f"block index, got {self.pattern!r}") from None

    @classmethod
    def single_task(cls, strength: float, inner: Any = None, pattern: str = F.BLOCK_PATTERN) -> LiNeS:
        """The paper's single-task setting: one fine-tuned model edited to forget less of the base. The shallowest
        block keeps ``strength`` of its task vector and the deepest all of it (α = λ, β = 1 − λ), so block l of L
        gets λ + (1 − λ)·l/(L − 1).

        Args:
            strength: λ, the scale of the shallowest block (the paper tunes it in [0, 1]).
            inner: as for :class:`LiNeS` (None: task arithmetic, which for one expert is its task vector).
            pattern: as for :class:`LiNeS`.

        In a recipe: ``merge_method: lines`` with ``parameters: {alpha: λ, beta: 1 − λ}``.
        """
        check_number(f"{cls.__name__}.single_task", "strength", strength)
        return cls(inner=inner, alpha=strength, beta=1.0 - strength, pattern=pattern)

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self.inner.requires)

    @property
    def global_pass(self) -> bool:
        return True  # the block count L is model-wide

    def prepare(self, plan: MergePlan) -> Prepared:
        inner = self.inner.prepare(plan)
        indices = {name: F.block_index(name, self.pattern) for name in plan.names}
        numbered = [i for i in indices.values() if i is not None]
        layers = 1 + max(numbered) if numbered else 1
        alpha = self.alpha if self.alpha is not None else self._default_alpha(plan, inner)
        return LiNeSPrepared(self, plan.num_experts, inner=inner, indices=indices, layers=layers, alpha=alpha)

    def _default_alpha(self, plan: MergePlan, inner: Prepared) -> float:
        def partial(name: str) -> tuple[float, float]:
            base = plan.base_tensor(name)
            tensors = plan.expert_tensors(name, base)
            out = inner.merge_tensor(name, base, tensors, plan.stats(name))
            return (float(torch.stack([t - base for t in tensors]).sum(0).abs().double().sum()),
                    float((out - base).abs().double().sum()))

        summed = merged = 0.0
        for part_summed, part_merged in plan.map(partial, "LiNeS alpha").values():  # summed in plan order
            summed += part_summed
            merged += part_merged
        if merged == 0.0:
            return 1.0
        return summed / (plan.num_experts * merged)

    def layer_scale(self, name: str, prepared: Prepared) -> float:
        """The factor applied to tensor ``name``'s merged task vector in the prepared merge."""
        index = prepared["indices"].get(name)
        if index is None:
            index = F.block_index(name, self.pattern)
        layers = prepared["layers"]
        if index is None or layers <= 1:
            return prepared["alpha"]
        return prepared["alpha"] + self.beta * index / (layers - 1)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        if prepared is None:
            prepared = self._unprepared(len(tensors))
        merged = prepared["inner"].merge_tensor(name, base, tensors, stats)
        return merged.sub_(base).mul_(self.layer_scale(name, prepared)).add_(base)

    @property
    def linear(self) -> bool:
        return self.inner.linear

    @property
    def row_local(self) -> bool:
        """As the inner strategy (the layer's scale is one number per tensor)."""
        return self.inner.row_local

    def working_set(self, num_experts: int) -> float:
        return self.inner.working_set(num_experts) + 1

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        return self.inner.tensor_working_set(num_experts, name, shape) + 1

    def linear_form(
        self, num_experts: int, name: str | None = None, prepared: Prepared | None = None
    ) -> LinearForm | None:
        if prepared is None or name is None:
            return None
        inner = prepared["inner"].linear_form(name)
        if inner is None:
            return None
        factor = self.layer_scale(name, prepared)
        coefficients = tuple(factor * c for c in inner.experts)
        # θ = θ₀ + f·(inner(θ) − θ₀) = (1 − f + f·c₀)θ₀ + Σ f·cᵢθᵢ
        return LinearForm(1.0 - factor + factor * inner.base, coefficients)

    def continual_form(self) -> ContinualForm:
        if self.alpha is None:
            raise NoContinualForm(
                "LiNeS(alpha=None) computes α over the whole merged model of every expert; give alpha= (and beta=) "
                "for continual merging"
            )
        return _LiNeSFold(self, self.inner.continual_form())


class _LiNeSFold(ContinualForm):
    """The inner strategy's continual form, its merged task vector scaled per block in the finish."""

    def __init__(self, strategy: LiNeS, inner: ContinualForm):
        self.strategy = strategy
        self.inner = inner
        self.quantities = inner.quantities
        self.row_local = getattr(inner, "row_local", False)  # the block's factor is one number per tensor
        self._cache: tuple[tuple[str, ...] | None, int] = (None, 1)

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return self.inner.begin(index, expert, names)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        return self.inner.fold(name, running, tau, stats, ctx)

    def reduce(self, name: str, running: Mapping[str, Tensor]) -> dict[str, float]:
        return self.inner.reduce(name, running)

    def _layers(self, names: Sequence[str]) -> int:
        key = tuple(names)
        if self._cache[0] != key:
            numbered = [i for i in (F.block_index(n, self.strategy.pattern) for n in names) if i is not None]
            self._cache = (key, 1 + max(numbered) if numbered else 1)
        return self._cache[1]

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        index = F.block_index(name, self.strategy.pattern)
        layers = self._layers(summary.names)
        alpha, beta = float(self.strategy.alpha), self.strategy.beta
        factor = alpha if index is None or layers <= 1 else alpha + beta * index / (layers - 1)
        merged = self.inner.finish(name, base, running, summary)
        return merged.sub_(base).mul_(factor).add_(base)


__all__ = ["LiNeS", "LiNeSPrepared"]
