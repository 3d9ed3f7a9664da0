"""Curvature-aware merges: Fisher merging, OTA (second-moment precision weighting, with Fast Fisher Grafting)
and the Fisher-weighted median (DRIFT-MEDIAN style). Formulas: ALGORITHMS.md, "Curvature-aware".

Each produces a merged task vector τ* and returns θ₀ + scale·τ*; scale = 1 is the plain weighted average, and
it needs tuning on validation data like task arithmetic's (``lightning_merge.tools.evaluation.sweep_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.formats.sidecar import FISHER_ESTIMATORS, RAW_SECOND_MOMENTS
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import ContinualForm, ContinualSummary, FoldContext, Prepared, Strategy
from lightning_merge.strategies.checks import (
    PerExpert,
    check_bool,
    check_choice,
    check_number,
    check_precision_weights,
    check_weights_so_far,
)
from lightning_merge.strategies.norms import TINY, expert_norm, model_norms
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


_NORMALIZE_REMEDY = "pass normalize=False"


def fisher_kind(estimator: str | None) -> str:
    """The statistic kind to read: ``"fisher"`` (each expert's preferred estimator) or ``"fisher.{estimator}"``."""
    return "fisher" if estimator is None else f"fisher.{estimator}"


@dataclasses.dataclass(frozen=True)
class _PrecisionStrategy(Strategy):
    """Shared by Fisher and OTA: ``θ = θ₀ + scale · Σ Pᵢτᵢ / Σ Pᵢ`` (no base: ``Σ Pᵢθᵢ / Σ Pᵢ``) with elementwise
    precisions Pᵢ that depend only on expert i, so adding experts one at a time is exact (:class:`_PrecisionFold`)."""

    scalable = True

    @property
    def row_local(self) -> bool:
        """Elementwise precisions (the model-wide norms come from :meth:`prepare`)."""
        return True

    def expert_precision(
        self, index: int, weight: float, stats: Mapping[str, Tensor], x: Tensor, norm: float | None
    ) -> Tensor:
        """Expert ``index``'s elementwise weight wᵢ·Pᵢ for the merge of ``x`` (its τ, or θ without a base)."""
        raise NotImplementedError

    def _expert_norm(self, index: int, expert: Any, names: Sequence[str]) -> float | None:
        return None

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        prepared = prepared if prepared is not None else self._unprepared(n)
        norms = prepared.get("norms")
        weights = self.expert_weights(n)
        num = torch.zeros_like(tensors[0])
        den = torch.zeros_like(tensors[0])
        for i, (t, s) in enumerate(zip(tensors, stats)):
            x = t if base is None else t - base
            p = self.expert_precision(i, weights[i], s, x, None if norms is None else norms[i])
            F.accumulate_precision(num, den, p, x)
        merged = F.precision_quotient(num, den)
        if base is None:
            empty = den <= 0
            if bool(empty.any()):
                # No expert weighs these entries (a zero Fisher with floor=0, v̂ = 0 with eps=0) and no base holds
                # them: the λ-weighted mean of the experts there (θ₀ itself where every expert kept it frozen), never 0.
                merged[empty] = sum(w * t[empty] for w, t in zip(weights, tensors)) / math.fsum(weights)
            return merged  # no base: scale is 1 (needs_base otherwise)
        return merged.mul_(self.scale).add_(base)

    def continual_form(self) -> ContinualForm:
        return _PrecisionFold(self)

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """The merged norm and ``weight_share``: each expert's mean share wᵢPᵢ / Σⱼ wⱼPⱼ of the merge's weight over
        the tensor's entries (what the precision weighting keeps of each expert)."""
        out = super().diagnose(plan, name, taus, merged)
        n = taus.shape[0]
        norms = plan.prepared.get("norms")
        weights = self.expert_weights(n)
        stats = plan.stats(name)
        shares = [self.expert_precision(i, weights[i], stats[i], taus[i], None if norms is None else norms[i])
                  .double().reshape(-1) for i in range(n)]
        total = torch.stack(shares).sum(0)
        covered = total > 0
        count = max(int(covered.sum()), 1)
        out["weight_share"] = [float((p[covered] / total[covered]).sum() / count) for p in shares]
        return out


class _PrecisionFold(ContinualForm):
    """Σ wᵢPᵢτᵢ and Σ wᵢPᵢ, kept per tensor; the merge is their quotient."""

    quantities = (("num", torch.float32), ("den", torch.float32))
    row_local = True

    def __init__(self, strategy: _PrecisionStrategy):
        self.strategy = strategy

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        s = self.strategy
        check_weights_so_far(s, index)
        return FoldContext(index, s.per_expert("weights", index, 1.0), {"norm": s._expert_norm(index, expert, names)})

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        num = torch.zeros_like(tau) if running is None else running["num"]
        den = torch.zeros_like(tau) if running is None else running["den"]
        p = self.strategy.expert_precision(ctx.index, ctx.weight, stats, tau, ctx.values.get("norm"))
        F.accumulate_precision(num, den, p, tau)
        return {"num": num, "den": den}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        return F.precision_quotient(running["num"], running["den"]).mul_(self.strategy.scale).add_(base)


@dataclasses.dataclass(frozen=True)
class Fisher(_PrecisionStrategy):
    """Fisher merging (Matena & Raffel): ``θ = Σ λᵢ F̃ᵢ θᵢ / Σ λᵢ F̃ᵢ``, ``F̃ = max(F, floor) + eps``.

    With a base, ``θ = θ₀ + scale · Σ λᵢF̃ᵢτᵢ / Σ λᵢF̃ᵢ`` (identical at scale 1). Uses each expert's preferred
    Fisher estimator (true, then per-example, then batch-empirical × batch size).

    Args:
        weights: one weight λᵢ per expert, or None for 1.
        scale: λ, the step along the merged task vector (needs a base when not 1).
        floor: F̃ = max(F, floor): keeps coordinates that no expert's Fisher covers finite (1e-6, the original's).
        eps: added to F̃ after the floor (0 by default).
        normalize: λᵢ ← λᵢ / ‖Fᵢ‖₂ with the norm over the whole model (computed in a first pass that reads only
            the statistics), so experts whose Fisher has a different overall scale count equally.
        estimator: which Fisher estimator to read (``"exact"``, ``"true"``, ``"example"``, ``"batch"``); None takes
            each expert's preferred one.
        favor_target: apply ``floor`` to the first expert only (the target model), as Matena & Raffel's code does
            by default (``favor_target_model=True``): where no other expert's Fisher covers a coordinate, the first
            expert's value wins instead of the average. Off by default here, where experts are usually peers (see
            docs/strategies.md); in the continual form the first expert is the first one added.
    """

    name = "fisher"
    reference = Reference("https://arxiv.org/abs/2111.09832",
                          ("https://github.com/mmatena/model_merging", FUSION_BENCH + "fisher_merging"))

    weights: PerExpert = None
    scale: float = 1.0
    floor: float = 1e-6
    eps: float = 0.0
    normalize: bool = True
    estimator: str | None = None
    favor_target: bool = False

    def __post_init__(self) -> None:
        owner = type(self)
        check_precision_weights(owner, self.weights)
        check_bool(owner, "favor_target", self.favor_target)
        check_number(owner, "scale", self.scale)
        check_number(owner, "floor", self.floor, low=0)
        check_number(owner, "eps", self.eps, low=0)
        check_choice(owner, "estimator", self.estimator, (None, *FISHER_ESTIMATORS))

    @property
    def requires(self) -> tuple[str, ...]:
        return (fisher_kind(self.estimator),)

    @property
    def needs_base(self) -> bool:
        return self.scale != 1.0  # at scale 1 the weighted average of θᵢ equals θ₀ + the average of τᵢ

    @property
    def global_pass(self) -> bool:
        return self.normalize

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def prepare(self, plan: MergePlan) -> Prepared:
        self.check_num_experts(plan.num_experts)
        norms = model_norms(plan, self.requires[0], self._precision, _NORMALIZE_REMEDY) if self.normalize else None
        return Prepared(self, plan.num_experts, norms=norms)

    def _expert_norm(self, index: int, expert: Any, names: Sequence[str]) -> float | None:
        if not self.normalize:
            return None
        return expert_norm(expert, names, self.requires[0], self._precision, index, _NORMALIZE_REMEDY)

    def _precision(self, index: int, fisher: Tensor) -> Tensor:
        """F̃ = max(F, floor) + eps: expert ``index``'s elementwise weight before λᵢ (``favor_target`` floors only the
        first expert's), and what ``normalize`` takes the norm of."""
        floor = self.floor if index == 0 or not self.favor_target else 0.0
        return F.fisher_precision(fisher, floor, self.eps)

    def expert_precision(
        self, index: int, weight: float, stats: Mapping[str, Tensor], x: Tensor, norm: float | None
    ) -> Tensor:
        scale = weight / max(norm, TINY) if norm is not None else weight
        return self._precision(index, stats[self.requires[0]]).mul_(scale)


@dataclasses.dataclass(frozen=True)
class OTA(_PrecisionStrategy):
    """OTA: precision-weighted averaging with Adam's second moments v as the curvature proxy.

    ``wᵢ = λᵢ (vᵢᵖ + eps)`` (optionally divided by its tensor mean), ``θ = θ₀ + scale · Σ wᵢτᵢ / Σ wᵢ``
    (no base: ``Σ wᵢθᵢ / Σ wᵢ``). ``power = 1`` is Fisher merging with v as the Fisher. By default vᵢ is the raw
    ``exp_avg_sq`` the optimizer held, as the reference code and the paper read it; ``bias_correct=True`` uses
    v̂ᵢ = vᵢ / (1 − β₂ᵗ) instead, t the expert's optimizer step for that parameter. The two agree when every expert
    ran the same number of steps (up to eps); with raw v an expert trained for fewer steps weighs less
    (docs/strategies.md gives both forms measured on experts of unequal lengths).

    Fast Fisher Grafting (``density`` or ``threshold``): saliency ``sᵢ = vᵢ ⊙ τᵢ²`` with the same v as the weights;
    expert i keeps the coordinates where sᵢ is in its top ``density`` fraction (per tensor) or ``sᵢ ≥ threshold``.
    Masked entries leave both the numerator and the denominator; where every expert is masked the coordinate stays
    at θ₀.

    Args:
        weights: one weight λᵢ per expert, or None for 1.
        scale: λ, the step along the merged task vector (needs a base when not 1).
        power: p in vᵖ (0.5: Adam's √v preconditioner).
        eps: added to vᵖ.
        mean_normalize: divide each expert's weights by their tensor mean.
        density: FFG by top-k per tensor (fraction kept, in (0, 1]); None for no FFG. The masks are the same in
            both ``bias_correct`` modes (the correction is one factor per tensor).
        threshold: FFG by an absolute saliency threshold κ (one per expert or one for all); None for no FFG. κ is
            compared with the saliency of the ``bias_correct`` mode: raw v ⊙ τ² by default, the quantity the
            paper's thresholds are defined on; v̂ ⊙ τ² with ``bias_correct=True`` (larger by 1/(1 − β₂ᵗ)).
        bias_correct: False (default): the raw ``exp_avg_sq``, the reference's and the paper's form; True:
            v̂ = v / (1 − β₂ᵗ) with the β₂ and step the capture recorded. Either form serves the weights and FFG's
            saliency alike. Statistics given as merge-ready tensors without metadata are used as given in both.
    """

    name = "ota"
    reference = Reference("https://arxiv.org/abs/2509.11167", ("https://github.com/pmahdavi/ota-merge",))

    weights: PerExpert = None
    scale: float = 1.0
    power: float = 0.5
    eps: float = 1e-8
    mean_normalize: bool = False
    density: float | None = None
    threshold: PerExpert = None
    bias_correct: bool = False

    def __post_init__(self) -> None:
        owner = type(self)
        check_precision_weights(owner, self.weights)
        check_bool(owner, "bias_correct", self.bias_correct)
        check_number(owner, "scale", self.scale)
        check_number(owner, "power", self.power, low=0)
        check_number(owner, "eps", self.eps, low=0)
        if self.density is not None:
            check_number(owner, "density", self.density, low=0, high=1)
        if self.threshold is not None:
            check_number(owner, "threshold", self.threshold, low=0, per_expert=True)
        if self.density is not None and self.threshold is not None:
            raise ValueError("OTA: give density or threshold for Fast Fisher Grafting, not both")

    @property
    def requires(self) -> tuple[str, ...]:
        """``exp_avg_sq`` read raw (:data:`~lightning_merge.formats.sidecar.RAW_SECOND_MOMENTS`), or bias-corrected."""
        return ("exp_avg_sq",) if self.bias_correct else (RAW_SECOND_MOMENTS,)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "threshold")

    @property
    def grafting(self) -> bool:
        return self.density is not None or self.threshold is not None

    @property
    def row_local(self) -> bool:
        """Not with a per-tensor mean (``mean_normalize``) or FFG's per-tensor top-k (``density``)."""
        return not self.mean_normalize and self.density is None

    @property
    def needs_base(self) -> bool:
        """A base is needed to scale the merged task vector, and by Fast Fisher Grafting's saliency v ⊙ τ²."""
        return self.scale != 1.0 or self.grafting

    def expert_precision(
        self, index: int, weight: float, stats: Mapping[str, Tensor], x: Tensor, norm: float | None
    ) -> Tensor:
        v = stats[self.requires[0]]
        w = F.ota_precision(v, self.power, self.eps, self.mean_normalize).mul_(weight)
        if self.grafting:
            saliency = v * x.square()
            if self.density is not None:
                keep = F.topk_mask(saliency, F.keep_count(self.density, saliency.numel()))
            else:
                keep = saliency >= self.per_expert("threshold", index, 0.0)
            w.mul_(keep)
        return w


@dataclasses.dataclass(frozen=True)
class WeightedMedian(Strategy):
    """Fisher-weighted median of the task vectors with TIES-like interference handling (DRIFT-MEDIAN style;
    this project's formulation, ALGORITHMS.md).

    Per coordinate: elect the sign of Σᵢ τᵢ (+ at 0); among the experts of that sign keep the top ⌈κ·|A|⌉ by
    |τᵢ|; weigh each by ``λᵢ · Fᵢ · Iᵢ`` (importance I = |τᵢ|, or 1); τ* is the weighted median of the kept
    values, the one of smaller magnitude where the weight splits exactly in half (a tie rule symmetric in sign, as
    ALGORITHMS.md's fidelity notes ask; 0 where the total weight is 0); ``θ = θ₀ + scale·τ*``. The output is
    always one of the inputs or 0. Vectorised: one sort along the expert axis, a cumulative sum and one gather.

    Args:
        weights: one weight λᵢ per expert, or None for 1.
        scale: λ, the step along the merged task vector.
        kappa: fraction of the agreeing experts kept per coordinate (1 keeps all).
        importance: ``"magnitude"`` (I = |τ|) or ``"none"`` (I = 1).
        estimator: which Fisher estimator to read; None takes each expert's preferred one.
        normalize: λᵢ ← λᵢ / ‖Fᵢ‖₂ over the whole model (a first pass that reads only the statistics), so an
            expert whose Fisher has a larger overall scale (more data, another loss reduction) does not win every
            median; as Fisher merging's ``normalize``.
    """

    name = "weighted_median"
    reference = Reference("https://openreview.net/forum?id=tB6bb0ZosX")
    scalable = True

    weights: PerExpert = None
    scale: float = 1.0
    kappa: float = 1.0
    importance: str = "magnitude"
    estimator: str | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        owner = type(self)
        check_precision_weights(owner, self.weights)
        check_bool(owner, "normalize", self.normalize)
        check_number(owner, "scale", self.scale)
        check_number(owner, "kappa", self.kappa, low=0, high=1)
        check_choice(owner, "importance", self.importance, ("magnitude", "none"))
        check_choice(owner, "estimator", self.estimator, (None, *FISHER_ESTIMATORS))

    @property
    def requires(self) -> tuple[str, ...]:
        return (fisher_kind(self.estimator),)

    @property
    def global_pass(self) -> bool:
        return self.normalize

    #: the sign election, the sort and the median run entry by entry, over the experts
    row_local = True

    def working_set(self, num_experts: int) -> float:
        """The sort over the experts holds values, int64 orders and weights per expert (measured: 36 copies of the
        tensor for 3 experts)."""
        return 10 * num_experts + 8

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def prepare(self, plan: MergePlan) -> Prepared:
        self.check_num_experts(plan.num_experts)
        norms = model_norms(plan, self.requires[0], remedy=_NORMALIZE_REMEDY) if self.normalize else None
        return Prepared(self, plan.num_experts, norms=norms)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        prepared = prepared if prepared is not None else self._unprepared(n)
        weights = self.expert_weights(n)
        norms = prepared.get("norms")
        if norms is not None:
            weights = [w / max(norm, TINY) for w, norm in zip(weights, norms)]
        tau = torch.stack([t - base for t in tensors]).reshape(n, -1)
        fisher = torch.stack([s[self.requires[0]] for s in stats]).reshape(n, -1)
        merged = weighted_median(tau, fisher, torch.tensor(weights), self.kappa, self.importance)
        return merged.view_as(base).mul_(self.scale).add_(base)

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """The merged norm and ``winners``: the share of the non-zero entries whose median each expert supplies
        (where two experts hold the same value, the later one)."""
        out = super().diagnose(plan, name, taus, merged)
        n = taus.shape[0]
        flat = taus.reshape(n, -1)
        chosen = merged.reshape(-1) / self.scale if self.scale else merged.reshape(-1)
        nonzero = chosen != 0
        first = torch.full_like(chosen, -1, dtype=torch.int64)
        for i in range(n):
            close = (flat[i] - chosen).abs() <= 1e-6 * (1 + chosen.abs())
            first[close & nonzero] = i
        out["winners"] = [float((first == i).double().sum() / max(int(nonzero.sum()), 1)) for i in range(n)]
        return out


def weighted_median(tau: Tensor, fisher: Tensor, weights: Tensor, kappa: float, importance: str) -> Tensor:
    """The rule of :class:`WeightedMedian` on ``(N, M)`` task vectors and Fishers; returns ``(M,)``."""
    n = tau.shape[0]
    gamma = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(tau) == gamma
    if kappa < 1.0:
        count = agree.sum(0)
        keep_n = torch.ceil(kappa * count - 1e-9).long()
        score = torch.where(agree, tau.abs(), torch.full_like(tau, -1.0))
        order = torch.argsort(score, dim=0, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(0, order, torch.arange(n).unsqueeze(1).expand_as(order))
        agree &= ranks < keep_n
    w = fisher * weights.view(n, 1)
    if importance == "magnitude":
        w = w * tau.abs()
    w = torch.where(agree, w, torch.zeros_like(w))
    # the kept values share the sign γ: order them by magnitude (γ·τ = |τ|), so that the tie rule (two equal halves
    # give the smaller) is symmetric in sign: negating every τ negates the median
    values = torch.where(agree, gamma * tau, torch.full_like(tau, math.inf))
    values, order = torch.sort(values, dim=0, stable=True)
    cum = torch.gather(w, 0, order).cumsum(0)
    total = cum[-1]
    first = (2 * cum >= total).to(torch.int8).argmax(0, keepdim=True)
    out = gamma * torch.gather(values, 0, first).squeeze(0)
    return torch.where(total > 0, out, torch.zeros_like(out))


__all__ = ["OTA", "Fisher", "WeightedMedian", "fisher_kind", "weighted_median"]
