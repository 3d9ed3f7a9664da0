"""Curvature-aware merges: Fisher merging, OTA (second-moment precision weighting, with Fast Fisher Grafting)
and the Fisher-weighted median (DRIFT-MEDIAN style). Formulas: ALGORITHMS.md, "Curvature-aware".

Each produces a merged task vector τ* and returns θ₀ + scale·τ*; scale = 1 is the plain weighted average, and
it needs tuning on validation data like task arithmetic's (``lightning_merge.evaluation.sweep_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_merge.stats import FISHER_ESTIMATORS
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Strategy, check_choice, check_number
from lightning_merge.strategies.linear import PerExpert

if TYPE_CHECKING:
    from lightning_merge.engine import MergePlan


def fisher_kind(estimator: str | None) -> str:
    """The statistic kind to read: ``"fisher"`` (each expert's preferred estimator) or ``"fisher.{estimator}"``."""
    return "fisher" if estimator is None else f"fisher.{estimator}"


def _apply_scale(owner: str, merged: Tensor, base: Tensor | None, scale: float) -> Tensor:
    """θ₀ + scale·(merged − θ₀); without a base only scale 1 is defined."""
    if base is None:
        if scale != 1.0:
            raise ValueError(f"{owner}(scale={scale}) needs a base model (θ = θ₀ + scale·τ); pass base=")
        return merged
    return merged.sub_(base).mul_(scale).add_(base)


@dataclasses.dataclass
class Fisher(Strategy):
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
        estimator: which Fisher estimator to read (``"true"``, ``"example"``, ``"batch"``); None takes each
            expert's preferred one.
    """

    name = "fisher"

    weights: PerExpert = None
    scale: float = 1.0
    floor: float = 1e-6
    eps: float = 0.0
    normalize: bool = True
    estimator: str | None = None
    _norms: list[float] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number("Fisher", "weights", self.weights, per_expert=True)
        check_number("Fisher", "scale", self.scale)
        check_number("Fisher", "floor", self.floor, low=0)
        check_number("Fisher", "eps", self.eps, low=0)
        check_choice("Fisher", "estimator", self.estimator, (None, *FISHER_ESTIMATORS))

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return (fisher_kind(self.estimator),)

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.scale != 1.0  # at scale 1 the weighted average of θᵢ equals θ₀ + the average of τᵢ

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def prepare(self, plan: MergePlan) -> None:
        super().prepare(plan)
        self._norms = model_norms(plan, self.requires[0]) if self.normalize else None

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        weights = self._weights(len(tensors))
        if self._norms is not None:
            weights = weights / torch.tensor(self._norms).clamp(min=torch.finfo(torch.float32).tiny)
        num = torch.zeros_like(tensors[0])
        den = torch.zeros_like(tensors[0])
        for w, t, s in zip(weights.tolist(), tensors, stats):
            f = F.fisher_precision(s[self.requires[0]], self.floor, self.eps).mul_(w)
            den.add_(f)
            num.addcmul_(f, t if base is None else t - base)
        merged = num.div_(den.clamp_(min=torch.finfo(torch.float32).tiny))
        if base is None:
            return _apply_scale("Fisher", merged, None, self.scale)
        return merged.mul_(self.scale).add_(base)


@dataclasses.dataclass
class OTA(Strategy):
    """OTA: precision-weighted averaging with Adam's bias-corrected second moments v̂ as the curvature proxy.

    ``wᵢ = λᵢ (v̂ᵢᵖ + eps)`` (optionally divided by its tensor mean), ``θ = θ₀ + scale · Σ wᵢτᵢ / Σ wᵢ``
    (no base: ``Σ wᵢθᵢ / Σ wᵢ``). ``power = 1`` is Fisher merging with v̂ as the Fisher.

    Fast Fisher Grafting (``density`` or ``threshold``): saliency ``sᵢ = v̂ᵢ ⊙ τᵢ²``; expert i keeps the
    coordinates where sᵢ is in its top ``density`` fraction (per tensor) or ``sᵢ ≥ threshold``. Masked entries
    leave both the numerator and the denominator; where every expert is masked the coordinate stays at θ₀.

    Args:
        weights: one weight λᵢ per expert, or None for 1.
        scale: λ, the step along the merged task vector (needs a base when not 1).
        power: p in v̂ᵖ (0.5: Adam's √v preconditioner).
        eps: added to v̂ᵖ.
        mean_normalize: divide each expert's weights by their tensor mean.
        density: FFG by top-k per tensor (fraction kept, in (0, 1]); None for no FFG.
        threshold: FFG by an absolute saliency threshold κ (one per expert or one for all); None for no FFG.
            Saliency uses the bias-corrected v̂ (the reference code uses raw v; they differ by 1/(1 − β₂ᵗ)).
    """

    name = "ota"
    requires = ("exp_avg_sq",)

    weights: PerExpert = None
    scale: float = 1.0
    power: float = 0.5
    eps: float = 1e-8
    mean_normalize: bool = False
    density: float | None = None
    threshold: PerExpert = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number("OTA", "weights", self.weights, per_expert=True)
        check_number("OTA", "scale", self.scale)
        check_number("OTA", "power", self.power, low=0)
        check_number("OTA", "eps", self.eps, low=0)
        if self.density is not None:
            check_number("OTA", "density", self.density, low=0, high=1)
        if self.threshold is not None:
            check_number("OTA", "threshold", self.threshold, low=0, per_expert=True)
        if self.density is not None and self.threshold is not None:
            raise ValueError("OTA: give density or threshold for Fast Fisher Grafting, not both")

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "threshold")

    @property
    def grafting(self) -> bool:
        return self.density is not None or self.threshold is not None

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.scale != 1.0 or self.grafting

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        if base is None and self.grafting:
            raise ValueError("OTA with Fast Fisher Grafting (density/threshold) needs a base model; pass base=")
        weights = self._weights(len(tensors)).tolist()
        num = torch.zeros_like(tensors[0])
        den = torch.zeros_like(tensors[0])
        for i, (t, s) in enumerate(zip(tensors, stats)):
            v = s["exp_avg_sq"]
            w = F.ota_precision(v, self.power, self.eps, self.mean_normalize).mul_(weights[i])
            x = t if base is None else t - base
            if self.grafting:
                saliency = v * x.square()
                if self.density is not None:
                    keep = F.topk_mask(saliency, F.keep_count(self.density, saliency.numel()))
                else:
                    keep = saliency >= self._per_expert("threshold", i, 0.0)
                w.mul_(keep)
            den.add_(w)
            num.addcmul_(w, x)
        covered = den > 0
        merged = torch.where(covered, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(num))
        if base is None:
            return _apply_scale("OTA", merged, None, self.scale)
        return merged.mul_(self.scale).add_(base)


@dataclasses.dataclass
class WeightedMedian(Strategy):
    """Fisher-weighted median of the task vectors with TIES-like interference handling (DRIFT-MEDIAN style;
    this project's formulation, ALGORITHMS.md).

    Per coordinate: elect the sign of Σᵢ τᵢ (+ at 0); among the experts of that sign keep the top ⌈κ·|A|⌉ by
    |τᵢ|; weigh each by ``λᵢ · Fᵢ · Iᵢ`` (importance I = |τᵢ|, or 1); τ* is the lower weighted median of the
    kept values (0 where the total weight is 0); ``θ = θ₀ + scale·τ*``. The output is always one of the
    inputs or 0. Vectorised: one sort along the expert axis, a cumulative sum and one gather.

    Args:
        weights: one weight λᵢ per expert, or None for 1.
        scale: λ, the step along the merged task vector.
        kappa: fraction of the agreeing experts kept per coordinate (1 keeps all).
        importance: ``"magnitude"`` (I = |τ|) or ``"none"`` (I = 1).
        estimator: which Fisher estimator to read; None takes each expert's preferred one.
    """

    name = "weighted_median"
    needs_base = True

    weights: PerExpert = None
    scale: float = 1.0
    kappa: float = 1.0
    importance: str = "magnitude"
    estimator: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number("WeightedMedian", "weights", self.weights, per_expert=True, low=0)
        check_number("WeightedMedian", "scale", self.scale)
        check_number("WeightedMedian", "kappa", self.kappa, low=0, high=1)
        check_choice("WeightedMedian", "importance", self.importance, ("magnitude", "none"))
        check_choice("WeightedMedian", "estimator", self.estimator, (None, *FISHER_ESTIMATORS))

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return (fisher_kind(self.estimator),)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        n = len(tensors)
        tau = torch.stack([t - base for t in tensors]).reshape(n, -1)
        fisher = torch.stack([s[self.requires[0]] for s in stats]).reshape(n, -1)
        merged = weighted_median(tau, fisher, self._weights(n), self.kappa, self.importance)
        return merged.view_as(base).mul_(self.scale).add_(base)


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
    values = torch.where(agree, tau, torch.full_like(tau, math.inf))
    values, order = torch.sort(values, dim=0, stable=True)
    cum = torch.gather(w, 0, order).cumsum(0)
    total = cum[-1]
    first = (2 * cum >= total).to(torch.int8).argmax(0, keepdim=True)
    out = torch.gather(values, 0, first).squeeze(0)
    return torch.where(total > 0, out, torch.zeros_like(out))


def model_norms(plan: MergePlan, kind: str) -> list[float]:
    """Per expert, the L2 norm of its statistic ``kind`` over every merged tensor (reads statistics only)."""
    squares = [0.0] * plan.num_experts
    for name in plan.names:
        for i, value in enumerate(plan.statistics(name, kind)):
            squares[i] += float(value.double().square().sum())
    return [math.sqrt(s) for s in squares]


__all__ = ["OTA", "Fisher", "WeightedMedian", "model_norms", "weighted_median"]
