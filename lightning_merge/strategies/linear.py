"""The linear family: weighted average, task arithmetic, and the sparsify-elect-combine engine behind TIES,
DARE and Breadcrumbs (one engine, configured; not a tree of algorithms)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Strategy, check_choice, check_number

if TYPE_CHECKING:
    from lightning_merge.engine import MergePlan

PerExpert = float | list[float] | None


@dataclasses.dataclass
class Linear(Strategy):
    """Weighted average of the experts: ``θ = Σ λᵢθᵢ / Σ λᵢ`` (or ``Σ λᵢθᵢ`` without normalisation).

    Needs no base (a base, if given, is ignored).

    Args:
        weights: one weight per expert, or None for uniform weights.
        normalize: divide by the sum of the weights.
    """

    name = "linear"
    needs_base = False

    weights: PerExpert = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number("Linear", "weights", self.weights, per_expert=True)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        return F.weighted_sum(list(tensors), self._weights(len(tensors)), self.normalize)


@dataclasses.dataclass
class TaskVectorMerge(Strategy):
    """Sparsify each task vector, optionally elect signs, combine: ``θ = θ₀ + scale · combine(sparsify(τᵢ))``.

    The shared engine of :class:`TaskArithmetic`, :class:`Ties`, :class:`Dare` and :class:`Breadcrumbs`
    (mergekit's "generalized task arithmetic"). Subclasses only choose the sparsification.

    Args:
        weights: one weight per expert (λᵢ), or None for 1.
        scale: λ, the step along the merged task vector.
        normalize: divide the combined task vector by the weights' sum (by the agreeing weights or counts
            under sign election).
        election: None (no sign election), ``"weighted"`` (mergekit's convention: elect on Σ wᵢτᵢ, divide by
            the agreeing weights) or ``"unweighted"`` (PEFT's: elect on Σ τᵢ, divide by the agreeing count).
        rescale: after sparsification, ``"none"`` keeps kept entries as they are; ``"l1"`` matches their L1 norm
            to the unsparsified task vector's (mergekit's ``rescale``); :class:`Dare` adds ``"inverse"``.
        weighting: None combines with the scalar weights only. ``"fisher"`` or ``"ota"`` makes the combine a
            precision-weighted mean ``τ* = Σ wᵢ Pᵢ τᵢ' / Σ wᵢ Pᵢ`` of the sparsified task vectors τᵢ', the sums over
            every expert without election and over the agreeing entries with it (mergekit's ``normalize``
            with elementwise weights), with ``P = max(F, 1e-6) / ‖F‖₂`` (Fisher merging's weights, the norm over
            the whole model) or ``P = v̂^0.5 + 1e-8`` (OTA's). ``normalize`` is then ignored (it is always a mean,
            so tune ``scale`` as for :class:`~lightning_merge.strategies.Fisher`). This is how DARE, TIES or CABS
            compose with curvature: ``Dare(drop_rate=0.5, weighting="fisher")``.
    """

    weights: PerExpert = None
    scale: float = 1.0
    normalize: bool = False
    election: str | None = None
    rescale: str = "none"
    weighting: str | None = None
    _norms: list[float] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.weights is not None:
            check_number(owner, "weights", self.weights, per_expert=True)
        check_number(owner, "scale", self.scale)
        check_choice(owner, "election", self.election, (None, "weighted", "unweighted"))
        check_choice(owner, "rescale", self.rescale, ("inverse", "l1", "none") if owner == "Dare" else ("l1", "none"))
        check_choice(owner, "weighting", self.weighting, (None, "fisher", "ota"))

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return {None: (), "fisher": ("fisher",), "ota": ("exp_avg_sq",)}[self.weighting]

    def prepare(self, plan: MergePlan) -> None:
        super().prepare(plan)
        if self.weighting == "fisher":
            from lightning_merge.strategies.curvature import model_norms

            self._norms = model_norms(plan, "fisher")

    def _rescaled(self, tau: Tensor, kept: Tensor) -> Tensor:
        return F.l1_rescale(tau, kept) if self.rescale == "l1" else kept

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def sparsify(self, name: str, index: int, tau: Tensor) -> Tensor:
        """Return expert ``index``'s task vector after sparsification (identity here)."""
        return tau

    def sparsify_stack(self, name: str, buf: Tensor, stats: Sequence[Mapping[str, Tensor]]) -> None:
        """Sparsify the stacked task vectors ``buf (N, *shape)`` in place; the default calls :meth:`sparsify` per
        expert. Strategies whose masks depend on each other (CABS) override this."""
        for i in range(buf.shape[0]):
            sparse = self.sparsify(name, i, buf[i])
            if sparse is not buf[i]:
                buf[i].copy_(sparse)
            del sparse

    def finish(self, name: str, mixed: Tensor, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        """Post-process the merged task vector before scaling (identity here; consensus masks it)."""
        return mixed

    def precision(self, index: int, stat: Mapping[str, Tensor]) -> Tensor:
        """Expert ``index``'s elementwise precision for ``weighting``: Fisher merging's or OTA's default weights
        (a new tensor)."""
        if self.weighting == "fisher":
            p = F.fisher_precision(stat["fisher"])
            if self._norms is not None:
                p.div_(max(self._norms[index], torch.finfo(torch.float32).tiny))
            return p
        return F.ota_precision(stat["exp_avg_sq"])

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        weights = self._weights(len(tensors))
        buf = torch.empty((len(tensors), *base.shape), dtype=base.dtype)
        for i, t in enumerate(tensors):
            torch.sub(t, base, out=buf[i])
        self.sparsify_stack(name, buf, stats)
        if self.weighting is not None:
            mixed = self._precision_mean(buf, weights, stats)
        elif self.election is None:
            mixed = F.weighted_sum(list(buf), weights, self.normalize)
        else:
            mixed = F.combine_task_vectors(buf, weights, election=self.election, normalize=self.normalize,
                                           inplace=True)
        del buf
        return self.finish(name, mixed, base, tensors).mul_(self.scale).add_(base)

    def _precision_mean(self, buf: Tensor, weights: Tensor, stats: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """Σ wᵢPᵢτᵢ' / Σ wᵢPᵢ: over every expert without election (so DARE's inverse rescale stays unbiased),
        over the agreeing entries with election (TIES' disjoint mean; 0 where none agrees)."""
        ws = weights.tolist()
        if self.election is None:  # one precision at a time
            precisions = (self.precision(i, stats[i]).mul_(w) for i, w in enumerate(ws))
        else:
            precisions = [self.precision(i, stats[i]).mul_(w) for i, w in enumerate(ws)]
            if self.election == "weighted":
                signed = torch.zeros_like(buf[0])
                for p, tau in zip(precisions, buf):
                    signed.addcmul_(p, tau)
            else:
                signed = buf.sum(0)
            positive = signed >= 0
            for p, tau in zip(precisions, buf):
                p.mul_(torch.where(positive, tau > 0, tau < 0))
        num = torch.zeros_like(buf[0])
        den = torch.zeros_like(buf[0])
        for p, tau in zip(precisions, buf):
            den.add_(p)
            num.addcmul_(p, tau)
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(num))


@dataclasses.dataclass
class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: ``θ = θ₀ + scale · Σ λᵢ τᵢ``. ``scale = 1/N`` is the uniform average.

    Args: see :class:`TaskVectorMerge`.
    """

    name = "task_arithmetic"


def _check_density(owner: str, value: float | list[float]) -> None:
    check_number(owner, "density", value, low=0.0, high=1.0, per_expert=True)


@dataclasses.dataclass
class Ties(TaskVectorMerge):
    """TIES-merging: trim each task vector to its top-``density`` entries by magnitude, elect signs, average
    the agreeing entries (disjoint mean).

    Args:
        density: fraction kept per task vector (``k = max(1, int(density·numel))``), one number or one per expert.
        topk: ``"tensor"`` trims per tensor (mergekit, PEFT: the default); ``"model"`` keeps the top-k over
            the whole model per expert (the original paper's code; one extra read pass, exact, ties broken by
            the lower flat index in tensor order).
        election: ``"weighted"`` (mergekit, default) or ``"unweighted"`` (PEFT).
        weights, scale, normalize: see :class:`TaskVectorMerge`; normalize defaults to True (disjoint mean).
    """

    name = "ties"

    density: float | list[float] = 0.2
    topk: str = "tensor"
    normalize: bool = True
    election: str | None = "weighted"

    _thresholds: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density("Ties", self.density)
        check_choice("Ties", "topk", self.topk, ("tensor", "model"))
        if self.election is None:
            raise ValueError("Ties.election must be 'weighted' or 'unweighted' (TaskArithmetic has no election)")

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density")

    def prepare(self, plan: MergePlan) -> None:
        super().prepare(plan)
        self._thresholds = {}
        if self.topk == "model":
            densities = [self._per_expert("density", i, 0.2) for i in range(plan.num_experts)]
            self._thresholds = model_topk_thresholds(plan, densities)

    def sparsify(self, name: str, index: int, tau: Tensor) -> Tensor:
        if self.topk == "model":
            return self._rescaled(tau, tau * self._thresholds[name][index].mask(tau))
        return self._rescaled(tau, tau * F.magnitude_mask(tau, self._per_expert("density", index, 0.2)))


@dataclasses.dataclass
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
        weights, scale: see :class:`TaskVectorMerge`.
    """

    name = "dare"

    drop_rate: float | list[float] = 0.9
    combine: str = "linear"
    rescale: str = "inverse"
    seed: int = 0
    normalize: bool | None = None
    election: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("Dare", "drop_rate", self.drop_rate, low=0.0, high=1.0, per_expert=True)
        check_choice("Dare", "combine", self.combine, ("linear", "ties"))
        if self.election is None and self.combine == "ties":
            self.election = "weighted"
        if self.normalize is None:
            self.normalize = self.combine == "ties"

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "drop_rate")

    def sparsify(self, name: str, index: int, tau: Tensor) -> Tensor:
        p = self._per_expert("drop_rate", index, 0.9)
        if p <= 0:
            return tau
        keep = 1.0 - p
        kept = tau * F.random_mask(tau.shape, keep, F.tensor_seed(self.seed, name, index))
        if self.rescale == "inverse":
            return kept / keep if keep > 0 else kept
        return self._rescaled(tau, kept)


@dataclasses.dataclass
class Breadcrumbs(TaskVectorMerge):
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so that
    ``density`` remains, then task arithmetic (or TIES election with ``election="weighted"``).

    Args:
        density: fraction kept, one number or one per expert.
        gamma: fraction of largest-magnitude entries dropped, one number or one per expert.
        weights, scale, normalize, election: see :class:`TaskVectorMerge`.
    """

    name = "breadcrumbs"

    density: float | list[float] = 0.9
    gamma: float | list[float] = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density("Breadcrumbs", self.density)
        check_number("Breadcrumbs", "gamma", self.gamma, low=0.0, high=1.0, per_expert=True)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "gamma")

    def sparsify(self, name: str, index: int, tau: Tensor) -> Tensor:
        density = self._per_expert("density", index, 0.9)
        gamma = self._per_expert("gamma", index, 0.01)
        return self._rescaled(tau, tau * F.breadcrumbs_mask(tau, density, gamma))


# -- model-wide top-k -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _GlobalCut:
    """Keep entries whose |τ| float32 bit pattern is above ``bits``, plus the first ``quota`` equal to it."""

    bits: int
    quota: int
    keep_all: bool = False
    keep_none: bool = False

    def mask(self, tau: Tensor) -> Tensor:
        if self.keep_all:
            return torch.ones_like(tau, dtype=torch.bool)
        if self.keep_none:
            return torch.zeros_like(tau, dtype=torch.bool)
        bits = tau.abs().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
        equal = bits == self.bits
        keep = (bits > self.bits) | (equal & (torch.cumsum(equal, 0) <= self.quota))
        return keep.view(tau.shape)


def model_topk_thresholds(plan: MergePlan, densities: list[float]) -> dict[str, list[_GlobalCut]]:
    """Exact model-wide top-k of |τᵢ| per expert, in two streaming passes over float32 bit histograms.

    Non-negative float32 values order like their int32 bit patterns. Pass 1 counts the high 16 bits; the bin
    holding the k-th largest is then resolved by the low 16 bits of the entries in that bin (pass 2, which keeps
    only those entries' low bits). Ties at the threshold are kept in tensor order, then flat index.
    """
    names = plan.names
    n_experts = plan.num_experts
    total = sum(plan.spec(n).numel for n in names)
    ks = [F.keep_count(d, total) if d < 1 else total for d in densities]

    def bits_of(name: str) -> Tensor:
        return plan.task_vectors(name).abs().contiguous().view(torch.int32).reshape(n_experts, -1)

    hist = torch.zeros(n_experts, 1 << 15, dtype=torch.int64)
    for name in names:
        b = bits_of(name)
        for i in range(n_experts):
            hist[i] += torch.bincount((b[i] >> 16).clamp_(0, (1 << 15) - 1), minlength=1 << 15)
    at_or_above = hist.flip(1).cumsum(1).flip(1)
    bins = []
    for i in range(n_experts):
        k = ks[i]
        idx = torch.nonzero(at_or_above[i] >= k).flatten() if k > 0 else torch.tensor([], dtype=torch.int64)
        bins.append(int(idx.max()) if len(idx) else -1)

    low_bits: dict[str, list[Tensor]] = {}
    for name in names:
        b = bits_of(name)
        low_bits[name] = [
            (b[i][(b[i] >> 16) == bins[i]] & 0xFFFF) if bins[i] >= 0 else torch.empty(0, dtype=torch.int32)
            for i in range(n_experts)
        ]

    cuts: dict[str, list[_GlobalCut]] = {name: [] for name in names}
    for i in range(n_experts):
        k = ks[i]
        if k >= total or k == 0:
            for name in names:
                cuts[name].append(_GlobalCut(0, 0, keep_all=k >= total and k > 0, keep_none=k == 0))
            continue
        above_bin = int(at_or_above[i, bins[i] + 1]) if bins[i] + 1 < (1 << 15) else 0
        lo_hist = torch.zeros(1 << 16, dtype=torch.int64)
        for name in names:
            lo_hist += torch.bincount(low_bits[name][i].to(torch.int64), minlength=1 << 16)
        lo_at_or_above = lo_hist.flip(0).cumsum(0).flip(0)
        need = k - above_bin
        lo = int(torch.nonzero(lo_at_or_above >= need).flatten().max())
        threshold = (bins[i] << 16) | lo
        greater = above_bin + (int(lo_at_or_above[lo + 1]) if lo + 1 < (1 << 16) else 0)
        remaining = k - greater
        for name in names:
            equal = int((low_bits[name][i] == lo).sum())
            quota = max(0, min(remaining, equal))
            remaining -= quota
            cuts[name].append(_GlobalCut(threshold, quota))
    return cuts
