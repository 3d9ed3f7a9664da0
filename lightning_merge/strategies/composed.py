"""CABS, TALL masks / Consensus, the ``Generalized`` preset that composes any sparsification with sign election,
consensus and curvature weighting, all presets of the one task-vector engine; and LiNeS, which wraps any strategy.
Rules: ALGORITHMS.md."""

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
    PerExpert,
    Prepared,
    Strategy,
    check_choice,
    check_int,
    check_number,
    set_field,
)
from lightning_merge.strategies.linear import TaskArithmetic, TaskVectorMerge, _check_density
from lightning_merge.strategies.sparsify import SCOPES, SPARSIFIERS, Sparsification

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


def _check_order(owner: str, order: list[int] | None, n: int) -> None:
    if order is not None and sorted(order) != list(range(n)):
        raise ValueError(
            f"{owner}.order must list every expert index 0..{n - 1} once (the pruning order), got {order!r}"
        )


@dataclasses.dataclass(frozen=True)
class Cabs(TaskVectorMerge):
    """CABS: conflict-aware, balanced sparsification, then task arithmetic.

    Balanced (n:m): each run of ``m`` consecutive entries of a task vector (row-major) keeps its ``n`` largest
    magnitudes. Conflict-aware: experts are pruned one after another in ``order``; each chooses only among the
    positions no earlier expert took, so at density ≤ 1/N the kept task vectors are disjoint
    (``⟨τ₁', τ₂'⟩ = 0``) and no rescaling is needed. ``θ = θ₀ + scale · Σ λₖ τₖ'``.

    Incomplete groups: a tensor whose size is not a multiple of ``m`` ends with a group of ``g < m`` entries,
    which keeps ``ceil(n·g/m)`` (the same density). A group with fewer free positions than its quota keeps all
    free ones and completes the quota with the largest ``|τ|`` among the taken positions (the reference scripts'
    rule; there the parts overlap). A kept zero takes no position (the reference's would: documented in
    docs/strategies.md). Tensors smaller than ``m`` are one such group.

    Args:
        n: entries kept per group (the paper's 64 of 256 on 7B models, 3 of 32 on RoBERTa).
        m: group size.
        order: the pruning order as a list of expert indices (the first expert chooses freely); None keeps the
            given order. Order matters: earlier experts keep more of their own mass.
        weights: λₖ per expert (the paper used 1.2 each on 7B models), or None for 1.
        scale: a global step along the merged task vector.
        weighting: ``"fisher"`` / ``"ota"`` for a precision-weighted mean instead of the sum (see
            :class:`TaskVectorMerge`).
    """

    name = "cabs"

    n: int = 64
    m: int = 256
    order: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n, bool) or not isinstance(self.n, int) or isinstance(self.m, bool) or \
                not isinstance(self.m, int) or not 0 <= self.n <= self.m or self.m < 1:
            raise ValueError(f"Cabs needs integers 0 <= n <= m and m >= 1 (n:m sparsity), got n={self.n!r}, "
                             f"m={self.m!r}")
        if self.election is not None:
            raise ValueError("Cabs' masks (nearly) never overlap, so sign election has nothing to resolve; leave "
                             "election=None")
        if self.rescale != "none":
            raise ValueError("Cabs keeps the kept entries as they are (no rescaling); leave rescale='none'")

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification("cabs", n=self.n, m=self.m, order=self.order, rescale=self.rescale)

    def prepare(self, plan: MergePlan) -> Prepared:
        _check_order("Cabs", self.order, plan.num_experts)
        return super().prepare(plan)


@dataclasses.dataclass(frozen=True)
class Generalized(TaskVectorMerge):
    """The composable task-vector merge: any sparsification, with or without sign election, a consensus mask,
    and scalar or curvature weights; mergekit's "generalized task arithmetic" with this project's pieces.

    ``θ = θ₀ + scale · consensus(combine(sparsify(τᵢ)))``. Examples:

    * ``Generalized(sparsification="saliency", density=0.2, election="weighted", normalize=True)``: Fast Fisher
      Grafting's saliency mask (``v̂ ⊙ τ²``) in place of TIES' magnitude trim.
    * ``Generalized(sparsification="random", density=0.5, weighting="fisher")``: DARE with Fisher weights.
    * ``Generalized(sparsification="cabs", density=0.25, consensus_k=2)``: CABS masks, then TALL consensus.

    Args:
        sparsification: a method of :data:`~lightning_merge.strategies.sparsify.SPARSIFIERS`: ``"none"``,
            ``"magnitude"`` (TIES' top-k of |τ|), ``"random"`` (DARE's Bernoulli drop), ``"breadcrumbs"`` (drop the
            ``gamma`` largest too), ``"cabs"`` (conflict-aware n:m with ``n = round(density·group_size)``) or
            ``"saliency"`` (top-k of ``statistic ⊙ τ²`` per tensor, FFG's rule).
        density: fraction kept (one number, or one per expert except for ``"cabs"``).
        rescale: ``"none"``, ``"inverse"`` or ``"l1"`` (see :class:`TaskVectorMerge`); None: ``"inverse"`` for
            ``"random"`` (DARE's rule) and ``"none"`` otherwise.
        topk: ``"magnitude"`` per ``"tensor"`` or over the whole ``"model"`` per expert.
        gamma: Breadcrumbs' fraction of largest entries dropped.
        group_size: CABS' m.
        order: CABS' pruning order.
        saliency: the statistic of the ``"saliency"`` rule: ``"exp_avg_sq"`` (FFG) or ``"fisher"``.
        seed: seeds the ``"random"`` masks per (seed, tensor, expert).
        consensus_k: None for no consensus; otherwise keep only entries where at least k TALL task masks
            agree (see :class:`Consensus`).
        tall_lambda: λᵢ of the TALL masks, one number or one per expert.
        weights, scale, normalize, election, weighting: see :class:`TaskVectorMerge`.
    """

    name = "generalized"

    sparsification: str = "none"
    density: float | list[float] = 1.0
    rescale: str | None = None
    topk: str = "tensor"
    gamma: float = 0.01
    group_size: int = 256
    order: list[int] | None = None
    saliency: str = "exp_avg_sq"
    seed: int = 0
    consensus_k: int | None = None
    tall_lambda: PerExpert = 0.6

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "sparsification", self.sparsification, tuple(SPARSIFIERS))
        if self.rescale is None:
            set_field(self, "rescale", "inverse" if self.sparsification == "random" else "none")
        super().__post_init__()
        _check_density(owner, self.density)
        check_choice(owner, "topk", self.topk, SCOPES)
        check_number(owner, "gamma", self.gamma, low=0.0, high=1.0)
        check_choice(owner, "saliency", self.saliency, ("exp_avg_sq", "fisher"))
        if self.sparsification == "cabs":
            if isinstance(self.density, (list, tuple)):
                raise ValueError(f"{owner}: CABS takes one density for all experts (n:m is shared)")
            if self.election is not None:
                raise ValueError(f"{owner}: CABS masks (nearly) never overlap; leave election=None")
        check_int(owner, "group_size", self.group_size, low=1)
        if self.consensus_k is not None:
            check_int(owner, "consensus_k", self.consensus_k, low=0)
        check_number(owner, "tall_lambda", self.tall_lambda, low=0.0, per_expert=True)

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification(
            self.sparsification, density=self.density, gamma=self.gamma, scope=self.topk, seed=self.seed,
            m=self.group_size, order=self.order, statistic=self.saliency, rescale=self.rescale,
        )

    @property
    def consensus(self) -> bool:
        return self.consensus_k is not None

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "tall_lambda")

    def prepare(self, plan: MergePlan) -> Prepared:
        _check_order(type(self).__name__, self.order, plan.num_experts)
        return super().prepare(plan)

    def finish(self, name: str, mixed: Tensor, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        if self.consensus_k is None:
            return mixed
        tau = torch.stack([t - base for t in tensors])
        lambdas = [self.per_expert("tall_lambda", i, 0.6) for i in range(len(tensors))]
        votes = F.tall_masks(tau, mixed, lambdas).sum(0)
        return mixed.mul_(votes >= self.consensus_k)



@dataclasses.dataclass(frozen=True)
class Consensus(Generalized):
    """Consensus merging with TALL masks (Wang et al.).

    ``τ_MTL`` is the combined task vector (task arithmetic ``Σ λᵢτᵢ`` by default; TIES with
    ``sparsification="magnitude", density=..., election="weighted", normalize=True``). Each expert's TALL mask is
    ``mᵢ = 1[|τᵢ| > λᵢ |τ_MTL − τᵢ|]`` (where its own task vector dominates what the others add); entries that at
    least ``k`` masks keep survive: ``θ = θ₀ + scale · 1[Σ mᵢ ≥ k] ⊙ τ_MTL``. ``k = 0`` is plain τ_MTL, ``k > N``
    gives θ₀; ``k = 2`` removes "selfish" weights (one task only) and "catastrophic" ones (no task).

    For storing N experts as one task vector plus N bit-masks, see :func:`lightning_merge.tools.tall.compress`.

    Args:
        consensus_k: the number k of task masks that must keep an entry (2 in the paper).
        tall_lambda: λᵢ (0.6, FusionBench's default; the paper picks from 0.2..0.6 on validation).
        other arguments: see :class:`Generalized`.
    """

    name = "consensus"

    consensus_k: int | None = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.consensus_k is None:
            raise ValueError("Consensus.consensus_k must be an integer >= 0 (Generalized has consensus off)")

    @classmethod
    def tall_reference(cls, consensus_k: int = 2, tall_lambda: Any = 0.6, density: float = 0.2,
                       scale: float = 1.0) -> Consensus:
        """Consensus over TIES as the TALL reference code builds τ_MTL: a model-wide top-``density`` trim of each
        task vector (``topk="model"``), the sign elected on the unweighted sum, and the disjoint *sum* of the
        agreeing entries (not their mean). The default :class:`Consensus` over TIES trims per tensor and takes the
        disjoint mean (``normalize=True``), as mergekit's TIES does; the reference's sum is larger, so its best
        ``scale`` is smaller.

        Args:
            consensus_k: k, the masks that must keep an entry.
            tall_lambda: λᵢ of the TALL masks.
            density: the fraction of each task vector's entries kept, over the whole model.
            scale: α, the step along the masked τ_MTL (the paper tunes it).
        """
        return cls(sparsification="magnitude", density=density, topk="model", election="unweighted",
                   normalize=False, consensus_k=consensus_k, tall_lambda=tall_lambda, scale=scale)


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
    needs_base = True

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
            check_number("LiNeS", "alpha", self.alpha)
        check_number("LiNeS", "beta", self.beta)
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
        check_number("LiNeS.single_task", "strength", strength)
        return cls(inner=inner, alpha=strength, beta=1.0 - strength, pattern=pattern)

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.inner.requires)

    @property
    def global_pass(self) -> bool:  # type: ignore[override]
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
        if base is None:
            raise ValueError("LiNeS scales a task vector: it needs a base model (base=...)")
        if prepared is None:
            prepared = self._unprepared(len(tensors))
        merged = prepared["inner"].merge_tensor(name, base, tensors, stats)
        return merged.sub_(base).mul_(self.layer_scale(name, prepared)).add_(base)

    @property
    def linear(self) -> bool:
        return self.inner.linear

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
        self._cache: tuple[tuple[str, ...] | None, int] = (None, 1)

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return self.inner.begin(index, expert, names)

    def fold(self, name, running, tau, stats, ctx):  # type: ignore[override]
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


__all__ = ["Cabs", "Consensus", "Generalized", "LiNeS", "LiNeSPrepared"]
