"""CABS, TALL masks / Consensus, LiNeS, and the generalized preset that composes sparsification, sign election,
consensus and curvature weighting in the one task-vector engine (ALGORITHMS.md, "Task-vector family").

Everything here is a configuration of :class:`~lightning_merge.strategies.TaskVectorMerge` except
:class:`LiNeS`, which wraps any strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Strategy, check_choice, check_number
from lightning_merge.strategies.linear import PerExpert, TaskVectorMerge, _check_density

if TYPE_CHECKING:
    from lightning_merge.engine import MergePlan

SPARSIFICATIONS = ("none", "magnitude", "random", "breadcrumbs", "cabs", "saliency")


def _check_order(owner: str, order: list[int] | None, n: int) -> None:
    if order is not None and sorted(order) != list(range(n)):
        raise ValueError(
            f"{owner}.order must list every expert index 0..{n - 1} once (the pruning order), got {order!r}"
        )


@dataclasses.dataclass
class Cabs(TaskVectorMerge):
    """CABS: conflict-aware, balanced sparsification, then task arithmetic.

    Balanced (n:m): each run of ``m`` consecutive entries of a task vector (row-major) keeps its ``n`` largest
    magnitudes. Conflict-aware: experts are pruned one after another in ``order``; each chooses only among the
    positions no earlier expert took, so the kept task vectors are disjoint (``⟨τ₁', τ₂'⟩ = 0``) and no
    rescaling is needed. ``θ = θ₀ + scale · Σ λₖ τₖ'``.

    Incomplete groups: a tensor whose size is not a multiple of ``m`` ends with a group of ``g < m`` entries,
    which keeps ``ceil(n·g/m)`` (the same density); a group with fewer free positions than its quota keeps all
    free ones. Tensors smaller than ``m`` are one such group.

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
            raise ValueError("Cabs' masks are disjoint, so sign election has nothing to resolve; leave election=None")
        if self.rescale != "none":
            raise ValueError("Cabs keeps the kept entries as they are (no rescaling); leave rescale='none'")

    @property
    def density(self) -> float:
        return self.n / self.m

    def prepare(self, plan: MergePlan) -> None:
        super().prepare(plan)
        _check_order("Cabs", self.order, plan.num_experts)

    def sparsify_stack(self, name: str, buf: Tensor, stats: Sequence[Mapping[str, Tensor]]) -> None:
        buf.mul_(F.cabs_masks(buf, self.n, self.m, self.order))


@dataclasses.dataclass
class Generalized(TaskVectorMerge):
    """The composable task-vector merge: any sparsification, with or without sign election, a consensus mask,
    and scalar or curvature weights; mergekit's "generalized task arithmetic" with this project's pieces.

    ``θ = θ₀ + scale · consensus(combine(sparsify(τᵢ)))``. Examples:

    * ``Generalized(sparsification="saliency", density=0.2, election="weighted", normalize=True)``: Fast Fisher
      Grafting's saliency mask (``v̂ ⊙ τ²``) in place of TIES' magnitude trim.
    * ``Generalized(sparsification="random", density=0.5, weighting="fisher")``: DARE with Fisher weights.
    * ``Generalized(sparsification="cabs", density=0.25, consensus_k=2)``: CABS masks, then TALL consensus.

    Args:
        sparsification: ``"none"``, ``"magnitude"`` (TIES' top-k of |τ|), ``"random"`` (DARE's Bernoulli drop,
            kept entries × 1/density), ``"breadcrumbs"`` (drop the ``gamma`` largest too), ``"cabs"``
            (conflict-aware n:m with ``n = round(density·group_size)``) or ``"saliency"`` (top-k of
            ``statistic ⊙ τ²`` per tensor, FFG's rule).
        density: fraction kept (one number, or one per expert except for ``"cabs"``).
        rescale: ``"none"`` (random drops still multiply kept entries by 1/density, DARE's rule) or ``"l1"``
            (every sparsification: match the kept entries' L1 norm to the unsparsified task vector's).
        gamma: Breadcrumbs' fraction of largest entries dropped.
        group_size: CABS' m.
        order: CABS' pruning order.
        saliency: the statistic of the ``"saliency"`` rule: ``"exp_avg_sq"`` (FFG) or ``"fisher"``.
        seed: seeds the ``"random"`` masks per (seed, tensor, expert).
        consensus_k: None for no consensus; otherwise keep only entries where at least k TALL task masks
            agree (see :class:`Consensus`).
        tall_lambda: λᵢ of the TALL masks, one number or one per expert.
        weights, scale, normalize, election, rescale, weighting: see :class:`TaskVectorMerge`.
    """

    name = "generalized"

    sparsification: str = "none"
    density: float | list[float] = 1.0
    gamma: float = 0.01
    group_size: int = 256
    order: list[int] | None = None
    saliency: str = "exp_avg_sq"
    seed: int = 0
    consensus_k: int | None = None
    tall_lambda: PerExpert = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "sparsification", self.sparsification, SPARSIFICATIONS)
        _check_density(owner, self.density)
        check_number(owner, "gamma", self.gamma, low=0.0, high=1.0)
        check_choice(owner, "saliency", self.saliency, ("exp_avg_sq", "fisher"))
        if self.sparsification == "cabs":
            if isinstance(self.density, (list, tuple)):
                raise ValueError(f"{owner}: CABS takes one density for all experts (n:m is shared)")
            if self.election is not None:
                raise ValueError(f"{owner}: CABS masks are disjoint; leave election=None")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"{owner}.group_size must be a positive integer, got {self.group_size!r}")
        if self.consensus_k is not None:
            check_number(owner, "consensus_k", self.consensus_k, low=0)
        check_number(owner, "tall_lambda", self.tall_lambda, low=0.0, per_expert=True)

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        kinds = list(super().requires)
        if self.sparsification == "saliency" and self.saliency not in kinds:
            kinds.append(self.saliency)
        return tuple(kinds)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "tall_lambda")

    def prepare(self, plan: MergePlan) -> None:
        super().prepare(plan)
        _check_order(type(self).__name__, self.order, plan.num_experts)

    def sparsify_stack(self, name: str, buf: Tensor, stats: Sequence[Mapping[str, Tensor]]) -> None:
        method = self.sparsification
        if method == "none":
            return
        if method == "cabs":
            n = round(float(self.density) * self.group_size)
            buf.mul_(F.cabs_masks(buf, n, self.group_size, self.order))
            return
        for i in range(buf.shape[0]):
            density = self._per_expert("density", i, 1.0)
            tau = buf[i]
            original = tau.clone() if self.rescale == "l1" else None
            if method == "magnitude":
                tau.mul_(F.magnitude_mask(tau, density))
            elif method == "breadcrumbs":
                tau.mul_(F.breadcrumbs_mask(tau, density, self.gamma))
            elif method == "random":
                if density < 1:
                    tau.mul_(F.random_mask(tau.shape, density, F.tensor_seed(self.seed, name, i)))
                    if density > 0 and original is None:
                        tau.div_(density)
            else:  # saliency
                score = stats[i][self.saliency] * tau.square()
                tau.mul_(F.topk_mask(score, F.keep_count(density, score.numel())))
            if original is not None:
                tau.copy_(F.l1_rescale(original, tau))

    def finish(self, name: str, mixed: Tensor, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        if self.consensus_k is None:
            return mixed
        tau = torch.stack([t - base for t in tensors])
        lambdas = [self._per_expert("tall_lambda", i, 0.6) for i in range(len(tensors))]
        votes = F.tall_masks(tau, mixed, lambdas).sum(0)
        return mixed.mul_(votes >= self.consensus_k)


@dataclasses.dataclass
class Consensus(Generalized):
    """Consensus merging with TALL masks (Wang et al.).

    ``τ_MTL`` is the combined task vector (task arithmetic ``Σ λᵢτᵢ`` by default; TIES with
    ``sparsification="magnitude", density=..., election="weighted", normalize=True``). Each expert's TALL mask is
    ``mᵢ = 1[|τᵢ| > λᵢ |τ_MTL − τᵢ|]`` (where its own task vector dominates what the others add); entries that at
    least ``k`` masks keep survive: ``θ = θ₀ + scale · 1[Σ mᵢ ≥ k] ⊙ τ_MTL``. ``k = 0`` is plain τ_MTL, ``k > N``
    gives θ₀; ``k = 2`` removes "selfish" weights (one task only) and "catastrophic" ones (no task).

    For storing N experts as one task vector plus N bit-masks, see :func:`lightning_merge.tall.compress`.

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


@dataclasses.dataclass
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
            ``alpha · τ_merged`` as large as the average task vector.
        beta: the extra scale of the deepest block (tune on validation; 0 is uniform scaling).
        pattern: a regular expression with one group capturing the block index.
    """

    name = "lines"
    needs_base = True

    inner: Any = None
    alpha: float | None = None
    beta: float = 1.0
    pattern: str = r"(?:^|\.)(\d+)(?:\.|$)"
    alpha_: float | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _blocks: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.inner is None:
            from lightning_merge.strategies.linear import TaskArithmetic

            self.inner = TaskArithmetic()
        if isinstance(self.inner, Mapping):
            self.inner = Strategy.from_dict(self.inner)
        if not isinstance(self.inner, Strategy) or isinstance(self.inner, LiNeS):
            raise ValueError(f"LiNeS.inner must be a strategy (or its to_dict()), e.g. LiNeS(TaskArithmetic()); "
                             f"got {self.inner!r}")
        if self.alpha is not None:
            check_number("LiNeS", "alpha", self.alpha)
        check_number("LiNeS", "beta", self.beta)
        import re

        try:
            if re.compile(self.pattern).groups != 1:
                raise ValueError
        except (re.error, ValueError, TypeError):
            raise ValueError(f"LiNeS.pattern must be a regular expression with exactly one group capturing the "
                             f"block index, got {self.pattern!r}") from None

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.inner.requires)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.to_dict(), "alpha": self.alpha, "beta": self.beta,
                "pattern": self.pattern}

    def prepare(self, plan: MergePlan) -> None:
        self.inner.prepare(plan)
        indices = {name: F.block_index(name, self.pattern) for name in plan.names}
        numbered = [i for i in indices.values() if i is not None]
        self._blocks = {"indices": indices, "L": 1 + max(numbered) if numbered else 1}
        self.alpha_ = self.alpha if self.alpha is not None else self._default_alpha(plan)

    def _default_alpha(self, plan: MergePlan) -> float:
        summed = merged = 0.0
        for name in plan.names:
            base = plan.base_tensor(name)
            tensors = plan.expert_tensors(name, base)
            summed += float(torch.stack([t - base for t in tensors]).sum(0).abs().double().sum())
            out = self.inner.merge_tensor(name, base, tensors, plan.stats(name))
            merged += float((out - base).abs().double().sum())
        if merged == 0.0:
            return 1.0
        return summed / (plan.num_experts * merged)

    def layer_scale(self, name: str) -> float:
        """The factor applied to tensor ``name``'s merged task vector (after :meth:`prepare`)."""
        alpha = self.alpha_ if self.alpha_ is not None else (self.alpha if self.alpha is not None else 1.0)
        index = self._blocks.get("indices", {}).get(name)
        if index is None:
            index = F.block_index(name, self.pattern)
        layers = self._blocks.get("L", 1)
        if index is None or layers <= 1:
            return alpha
        return alpha + self.beta * index / (layers - 1)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        if base is None:
            raise ValueError("LiNeS scales a task vector: it needs a base model (base=...)")
        merged = self.inner.merge_tensor(name, base, tensors, stats)
        return merged.sub_(base).mul_(self.layer_scale(name)).add_(base)


__all__ = ["SPARSIFICATIONS", "Cabs", "Consensus", "Generalized", "LiNeS"]
