"""The task-vector family: one engine (sparsify → elect → combine → scale) behind task arithmetic, TIES, DARE and
Breadcrumbs (mergekit's "generalized task arithmetic": presets, not a tree of algorithms). CABS, Consensus and
``Generalized`` are presets of the same engine (``cabs.py``, ``consensus.py``, ``generalized.py``)."""

from __future__ import annotations

import dataclasses
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
from lightning_merge.strategies.checks import (
    Owner,
    PerExpert,
    check_choice,
    check_number,
    check_precision_weights,
    check_weights_so_far,
    normalizing_sum,
    set_field,
)
from lightning_merge.strategies.linear import _add_scaled, _check_weight_sum, _linear_coefficients, _prefix_sum
from lightning_merge.strategies.norms import TINY, expert_norm, model_norms
from lightning_merge.strategies.registry import MERGEKIT, Reference
from lightning_merge.strategies.sparsify import RESCALES, SCOPES, Sparsification, random_chunks, tensor_topk_cuts

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

#: mergekit's one implementation of task arithmetic, TIES, DARE and Breadcrumbs
_GTA = MERGEKIT + "generalized_task_arithmetic.py"

WEIGHTINGS = (None, "fisher", "ota")
ELECTIONS = (None, "weighted", "unweighted")


_WEIGHTING_REMEDY = "use weighting='ota' or None"


def _fisher_weight(index: int, fisher: Tensor) -> Tensor:
    """Fisher merging's elementwise weight max(F, 1e-6) under ``weighting="fisher"``, whose norm the weights are
    normalised by (the floored weight's, as :class:`~lightning_merge.strategies.Fisher`'s)."""
    return F.fisher_precision(fisher)


@dataclasses.dataclass(frozen=True)
class TaskVectorMerge(Strategy):
    """The task-vector engine: ``θ = θ₀ + scale · consensus(combine(sparsify(τᵢ)))``.

    Every preset (:class:`TaskArithmetic`, :class:`Ties`, :class:`Dare`, :class:`Breadcrumbs`,
    :class:`~lightning_merge.strategies.Cabs`, :class:`~lightning_merge.strategies.Generalized`,
    :class:`~lightning_merge.strategies.Consensus`) only chooses the :class:`Sparsification` and defaults.

    Args:
        weights: one weight per expert (λᵢ), or None for 1.
        scale: λ, the step along the merged task vector.
        normalize: divide the combined task vector by the weights' sum (by the agreeing weights or counts
            under sign election).
        election: None (no sign election), ``"weighted"`` (mergekit's convention: elect on Σ wᵢτᵢ, divide by
            the agreeing weights) or ``"unweighted"`` (PEFT's: elect on Σ τᵢ, divide by the agreeing count).
        rescale: what happens to the entries a sparsification keeps: ``"none"``, ``"inverse"`` (divided by the
            kept fraction, DARE's rule) or ``"l1"`` (their L1 norm matched to the unsparsified task vector's,
            mergekit's ``rescale``). The same meaning for every sparsification.
        weighting: None combines with the scalar weights only. ``"fisher"`` or ``"ota"`` makes the combine a
            precision-weighted mean ``τ* = Σ wᵢ Pᵢ τᵢ' / Σ wᵢ Pᵢ`` of the sparsified task vectors τᵢ', the sums over
            every expert without election and over the agreeing entries with it, with ``P = F̃ / ‖F̃‖₂``,
            ``F̃ = max(F, 1e-6)`` (Fisher merging's weights, the norm over the whole model) or ``P = v̂^0.5 + 1e-8``
            (OTA's).
            ``normalize`` is then ignored (it is always a mean; tune ``scale``). This is how DARE, TIES or CABS
            compose with curvature: ``Dare(drop_rate=0.5, weighting="fisher")``.
    """

    scalable = True

    weights: PerExpert = None
    scale: float = 1.0
    normalize: bool = False
    election: str | None = None
    rescale: str = "none"
    weighting: str | None = None

    def __post_init__(self) -> None:
        owner = type(self)
        if self.weights is not None:
            check_number(owner, "weights", self.weights, per_expert=True)
        check_number(owner, "scale", self.scale)
        check_choice(owner, "election", self.election, ELECTIONS)
        check_choice(owner, "rescale", self.rescale, RESCALES)
        check_choice(owner, "weighting", self.weighting, WEIGHTINGS)
        if self.weighting is not None:  # a precision-weighted mean: the weights scale precisions
            check_precision_weights(owner, self.weights)
        if self.normalize and self.election is None and self.weighting is None:
            _check_weight_sum(owner, self.weights)  # with election the divisor is the agreeing weights, per entry

    # -- what a preset chooses ----------------------------------------------------------------------------------
    @property
    def sparsifier(self) -> Sparsification:
        """The preset's sparsification (none for task arithmetic)."""
        return Sparsification("none", rescale=self.rescale)

    @property
    def consensus(self) -> bool:
        """Whether a consensus mask follows the combine (:class:`~lightning_merge.strategies.Consensus`)."""
        return False

    # -- declarations -------------------------------------------------------------------------------------------
    @property
    def requires(self) -> tuple[str, ...]:
        kinds = list({None: (), "fisher": ("fisher",), "ota": ("exp_avg_sq",)}[self.weighting])
        for kind in self.sparsifier.requires:
            if kind not in kinds:
                kinds.append(kind)
        return tuple(kinds)

    @property
    def global_pass(self) -> bool:
        return self.weighting == "fisher" or self.sparsifier.global_pass

    @property
    def row_local(self) -> bool:
        """Without sparsification every step (difference, weighting, sign election, TALL's consensus masks) is entry
        by entry; a sparsifier's top-k, its random draw and its L1 rescale read the whole tensor."""
        return self.sparsifier.method == "none"

    @property
    def row_pass(self) -> bool:
        """TIES' per-tensor top-k (without rescaling): a pass over the rows finds each expert's cut
        (:func:`~lightning_merge.strategies.sparsify.tensor_topk_cuts`); DARE's and DELLA's random drops: each chunk
        draws its own entries, and with the L1 rescale a pass finds each expert's factor
        (:func:`~lightning_merge.strategies.sparsify.random_chunks`); the rest is entry by entry."""
        return self.sparsifier.row_pass

    def prepare_rows(self, prepared: Prepared, plan: MergePlan, name: str,
                     chunks: Sequence[tuple[int, int]]) -> list[Prepared]:
        if not self.row_pass:
            return super().prepare_rows(prepared, plan, name, chunks)
        context = prepared.get("sparsify") or {}
        if self.sparsifier.method in ("random", "della"):
            added = random_chunks(plan, name, chunks, self.sparsifier)
        else:
            densities = [float(self.sparsifier.keep_fraction(i)) for i in range(plan.num_experts)]
            added = [{"cuts": {**context.get("cuts", {}), name: cuts}}
                     for cuts in tensor_topk_cuts(plan, name, chunks, densities)]
        return [Prepared(self, prepared.num_experts, **{**prepared.values, "sparsify": {**context, **extra}})
                for extra in added]

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    @property
    def linear(self) -> bool:
        sp = self.sparsifier
        identity = sp.method == "none" or (
            not isinstance(sp.density, (list, tuple)) and sp.is_identity(0)
        )
        return identity and self.election is None and self.weighting is None and not self.consensus

    def linear_form(
        self, num_experts: int, name: str | None = None, prepared: Prepared | None = None
    ) -> LinearForm | None:
        sp = self.sparsifier
        if self.election is not None or self.weighting is not None or self.consensus:
            return None
        if not all(sp.is_identity(i) for i in range(num_experts)):
            return None
        coefficients = _linear_coefficients(type(self), self.expert_weights(num_experts), self.normalize,
                                            self.scale)
        return LinearForm(1.0 - sum(coefficients), tuple(coefficients))

    # -- batch merge --------------------------------------------------------------------------------------------
    def prepare(self, plan: MergePlan) -> Prepared:
        self.check_num_experts(plan.num_experts)
        norms = model_norms(plan, "fisher", _fisher_weight, _WEIGHTING_REMEDY) if self.weighting == "fisher" else None
        return Prepared(self, plan.num_experts, norms=norms, sparsify=self.sparsifier.prepare(plan))

    def precision(self, stat: Mapping[str, Tensor], norm: float | None) -> Tensor:
        """An expert's elementwise precision for ``weighting`` (a new tensor): Fisher merging's or OTA's default."""
        if self.weighting == "fisher":
            p = _fisher_weight(0, stat["fisher"])
            return p.div_(max(norm, TINY)) if norm is not None else p
        return F.ota_precision(stat["exp_avg_sq"])

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        prepared = prepared if prepared is not None else self._unprepared(n)
        weights = self.expert_weights(n)
        buf = torch.empty((n, *base.shape), dtype=base.dtype)
        for i, t in enumerate(tensors):
            torch.sub(t, base, out=buf[i])
        self.sparsifier.apply_stack(name, buf, stats, prepared.get("sparsify") or {})
        if self.weighting is not None:
            norms = prepared.get("norms")
            precisions = (self.precision(stats[i], None if norms is None else norms[i]).mul_(w)
                          for i, w in enumerate(weights))
            mixed = F.precision_mean(buf, precisions, self.election)
        elif self.election is None:
            mixed = F.weighted_sum(list(buf), torch.tensor(weights), self.normalize)
        else:
            mixed = F.combine_task_vectors(buf, torch.tensor(weights), election=self.election,
                                           normalize=self.normalize, inplace=True)
        del buf
        return self.finish(name, mixed, base, tensors).mul_(self.scale).add_(base)

    def finish(self, name: str, mixed: Tensor, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        """Post-process the merged task vector before scaling (identity here; consensus masks it)."""
        return mixed

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """The merged norm and, with a sparsification, what it keeps of each expert: ``kept`` holds each expert's
        kept ``density`` and ``overlap`` (the share of its kept entries another expert keeps too), with the counts.
        Sparsifies ``taus`` in place.

        A sparsifier only zeroes or rescales entries, so an entry is kept exactly where the sparsified τᵢ is non-zero
        (entries that were zero count as not kept)."""
        out = super().diagnose(plan, name, taus, merged)
        if self.sparsifier.method == "none":
            return out
        self.sparsifier.apply_stack(name, taus, plan.stats(name), plan.prepared.get("sparsify") or {})
        n = taus.shape[0]
        flat = taus.reshape(n, -1)
        keepers = torch.zeros(flat.shape[1], dtype=torch.int16)  # how many experts keep each entry
        for i in range(n):
            keepers += flat[i] != 0
        shared_anywhere = keepers >= 2
        del keepers
        counts, shared = [], []
        for i in range(n):
            kept = flat[i] != 0
            counts.append(int(kept.sum()))
            shared.append(int((kept & shared_anywhere).sum()))
        numel = flat.shape[1]
        out["kept"] = {
            "density": [c / numel for c in counts],
            "overlap": [s / c if c > 0 else 0.0 for s, c in zip(shared, counts)],
            "kept": counts,
            "shared": shared,
        }
        return out

    # -- continual ----------------------------------------------------------------------------------------------
    def continual_form(self) -> ContinualForm:
        owner = type(self).__name__
        sp = self.sparsifier
        if self.election is not None:
            raise NoContinualForm(
                f"{owner}(election={self.election!r}) elects each entry's sign over all experts at once, so it cannot "
                "fold experts one at a time; use election=None (task arithmetic, DARE or Breadcrumbs without TIES' "
                "election) or a precision-weighted strategy (fisher, ota)"
            )
        if self.consensus:
            raise NoContinualForm(f"{owner}'s consensus mask compares every expert with the merge of all of them")
        if sp.global_pass:
            raise NoContinualForm(
                f"{owner}(topk='model') thresholds over every expert's whole model; use topk='tensor'"
            )
        if sp.sequential and sp.order is not None:
            raise NoContinualForm(
                f"{owner}(order=...) prunes in a given order; experts arrive in their own (order=None)"
            )
        return _TaskVectorFold(self)


class _TaskVectorFold(ContinualForm):
    """The continual form of the task-vector engine without election or consensus: each expert's sparsified task
    vector τᵢ' (CABS: among the positions earlier experts left free) is added to Σ wᵢτᵢ', or to Σ wᵢPᵢτᵢ' and Σ wᵢPᵢ
    under curvature weighting."""

    def __init__(self, strategy: TaskVectorMerge):
        self.strategy = strategy
        sums = (("sum", torch.float32),) if strategy.weighting is None else (("num", torch.float32),
                                                                            ("den", torch.float32))
        self.quantities = sums + ((("taken", torch.bool),) if strategy.sparsifier.sequential else ())
        self.row_local = strategy.row_local  # no sparsifier: every step entry by entry

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        s = self.strategy
        s.sparsifier.keep_fraction(index)  # a per-expert list too short for this expert fails here, by name
        if s.normalize and s.weighting is None:
            _prefix_sum(s, index)
        if s.weighting is not None:
            check_weights_so_far(s, index)
        values = {"norm": expert_norm(expert, names, "fisher", _fisher_weight, index, _WEIGHTING_REMEDY)} \
            if s.weighting == "fisher" else {}
        return FoldContext(index, s.per_expert("weights", index, 1.0), values)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        s = self.strategy
        taken = None if running is None else running.get("taken")
        tau, taken = s.sparsifier.apply(name, ctx.index, tau, stats, {}, taken)
        out: dict[str, Tensor] = {}
        if s.weighting is None:
            out["sum"] = _add_scaled(None if running is None else running["sum"], tau, ctx.weight)
        else:
            p = s.precision(stats, ctx.values.get("norm")).mul_(ctx.weight)
            num = torch.zeros_like(tau) if running is None else running["num"]
            den = torch.zeros_like(tau) if running is None else running["den"]
            F.accumulate_precision(num, den, p, tau)
            out.update(num=num, den=den)
        if taken is not None:
            out["taken"] = taken
        return out

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        s = self.strategy
        if s.weighting is None:
            mixed = running["sum"].clone()
            if s.normalize:
                mixed.div_(normalizing_sum(type(s), summary.weights))
        else:
            mixed = F.precision_quotient(running["num"], running["den"])
        return mixed.mul_(s.scale).add_(base)


@dataclasses.dataclass(frozen=True)
class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: ``θ = θ₀ + scale · Σ λᵢ τᵢ``. ``scale = 1/N`` is the uniform average.

    Args: see :class:`TaskVectorMerge`.
    """

    name = "task_arithmetic"
    reference = Reference("https://arxiv.org/abs/2212.04089",
                          ("https://github.com/mlfoundations/task_vectors", _GTA))


def _check_density(owner: Owner, value: float | list[float]) -> None:
    check_number(owner, "density", value, low=0.0, high=1.0, per_expert=True)


@dataclasses.dataclass(frozen=True)
class Ties(TaskVectorMerge):
    """TIES-merging: trim each task vector to its top-``density`` entries by magnitude, elect signs, average
    the agreeing entries (disjoint mean).

    Args:
        density: fraction kept per task vector (``k = max(1, int(density·numel))``), one number or one per expert.
        topk: ``"tensor"`` trims per tensor (mergekit, PEFT: the default); ``"model"`` keeps the top-k over
            the whole model per expert (the original paper's code; one extra read pass, exact, ties broken by
            the lower flat index in tensor order).
        election: ``"weighted"`` (mergekit, default) or ``"unweighted"`` (PEFT).
        weights, scale, normalize, rescale, weighting: see :class:`TaskVectorMerge`; normalize defaults to True
            (disjoint mean).
    """

    name = "ties"
    reference = Reference("https://arxiv.org/abs/2306.01708",
                          ("https://github.com/prateeky2806/ties-merging", _GTA))

    density: float | list[float] = 0.2
    topk: str = "tensor"
    normalize: bool = True
    election: str | None = "weighted"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density(type(self), self.density)
        check_choice(type(self), "topk", self.topk, SCOPES)
        if self.election is None:
            raise ValueError("Ties.election must be 'weighted' or 'unweighted' (TaskArithmetic has no election)")

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density")

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification("magnitude", density=self.density, scope=self.topk, rescale=self.rescale)


@dataclasses.dataclass(frozen=True)
class Dare(TaskVectorMerge):
    """DARE: drop each task-vector entry with probability ``drop_rate``, rescale the rest, then combine
    linearly (``dare_linear``) or with TIES' sign election (``dare_ties``).

    Args:
        drop_rate: p, one number or one per expert (density = 1 − p).
        combine: ``"linear"`` (task arithmetic) or ``"ties"`` (weighted sign election and disjoint mean).
        rescale: ``"inverse"`` multiplies kept entries by 1/(1 − p) (the paper, so E[τ̂] = τ); ``"l1"``
            matches the L1 norm of the kept entries to τ's (mergekit); ``"none"`` keeps them as they are.
        seed: masks are drawn per tensor from (seed, tensor name, expert index): results do not depend on
            thread order.
        normalize: None chooses by ``combine`` (ties: disjoint mean; linear: plain sum).
        election: None chooses by ``combine`` (ties: ``"weighted"``).
        weights, scale, weighting: see :class:`TaskVectorMerge`.
    """

    name = "dare"
    reference = Reference("https://arxiv.org/abs/2311.03099",
                          ("https://github.com/yule-BUAA/MergeLM", _GTA))

    drop_rate: float | list[float] = 0.9
    combine: str = "linear"
    rescale: str = "inverse"
    seed: int = 0
    normalize: bool | None = None
    election: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "drop_rate", self.drop_rate, low=0.0, high=1.0, per_expert=True)
        check_choice(type(self), "combine", self.combine, ("linear", "ties"))
        if self.election is None and self.combine == "ties":
            set_field(self, "election", "weighted")
        if self.normalize is None:
            set_field(self, "normalize", self.combine == "ties")
        super().__post_init__()

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "drop_rate")

    @property
    def sparsifier(self) -> Sparsification:
        p = self.drop_rate
        density = [1.0 - x for x in p] if isinstance(p, (list, tuple)) else 1.0 - p
        return Sparsification("random", density=density, seed=self.seed, rescale=self.rescale)


@dataclasses.dataclass(frozen=True)
class Breadcrumbs(TaskVectorMerge):
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so that
    ``density`` remains, then task arithmetic (or TIES election with ``election="weighted"``).

    Args:
        density: fraction kept, one number or one per expert.
        gamma: fraction of largest-magnitude entries dropped, one number or one per expert.
        weights, scale, normalize, election, rescale, weighting: see :class:`TaskVectorMerge`.
    """

    name = "breadcrumbs"
    reference = Reference("https://arxiv.org/abs/2312.06795",
                          ("https://github.com/rezazzr/breadcrumbs", _GTA))

    density: float | list[float] = 0.9
    gamma: float | list[float] = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density(type(self), self.density)
        check_number(type(self), "gamma", self.gamma, low=0.0, high=1.0, per_expert=True)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "gamma")

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification("breadcrumbs", density=self.density, gamma=self.gamma, rescale=self.rescale)


__all__ = ["ELECTIONS", "WEIGHTINGS", "Breadcrumbs", "Dare", "TaskArithmetic", "TaskVectorMerge", "Ties"]
