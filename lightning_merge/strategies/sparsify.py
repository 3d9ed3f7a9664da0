"""The sparsifier registry: every way a task-vector merge keeps part of each task vector, in one place.

A :class:`Sparsification` is a method from :data:`SPARSIFIERS` with its parameters. It sparsifies one expert's task
vector at a time (:meth:`Sparsification.apply`), given the positions earlier experts took (CABS is the one method
whose choice depends on them), so the batch merge and the continual fold run the same code. ``rescale`` means one
thing everywhere:

- ``"none"``: kept entries stay as they are;
- ``"inverse"``: kept entries are divided by the kept fraction (DARE's 1/(1 − p), so E[τ̂] = τ for random drops);
- ``"l1"``: kept entries are scaled so their L1 norm equals the unsparsified task vector's (mergekit's ``rescale``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

#: method → what it keeps (the docstrings of the presets give the exact rules).
SPARSIFIERS = {
    "none": "everything",
    "magnitude": "the top-density entries by |τ| (TIES' trim), per tensor or over the whole model (scope)",
    "random": "each entry with probability density, seeded per (seed, tensor, expert) (DARE's drop)",
    "breadcrumbs": "the density entries below the gamma largest by |τ| (Model Breadcrumbs)",
    "saliency": "the top-density entries by statistic ⊙ τ² (Fast Fisher Grafting's saliency)",
    "cabs": "n:m per group among the positions earlier experts left free (CABS, conflict-aware and balanced)",
    "della": "each entry with probability density ± epsilon by its magnitude rank in its row, seeded per (seed, "
             "tensor, expert) (DELLA's MagPrune)",
}
RESCALES = ("none", "inverse", "l1")
#: CABS' rule for a group with fewer free positions than n (see :class:`Sparsification`)
OVERLAPS = ("fill", "free_only")
SCOPES = ("tensor", "model")


def _value(value: Any, index: int, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        if index >= len(value):
            raise ValueError(f"a per-expert list of {len(value)} values has no value for expert {index + 1}")
        return float(value[index])
    return float(value)


@dataclasses.dataclass(frozen=True)
class Sparsification:
    """One configured sparsification (see :data:`SPARSIFIERS`).

    Attributes:
        method: a key of :data:`SPARSIFIERS`.
        density: fraction kept (one number, or one per expert), for every method but ``"none"``.
        gamma: Breadcrumbs' fraction of largest entries dropped (one number, or one per expert).
        epsilon: DELLA's spread of keep probabilities around ``density`` (one number, or one per expert).
        scope: ``"magnitude"`` over each tensor or over the whole model per expert.
        seed: seed of ``"random"``.
        n, m: CABS' n:m (``n`` None: ``round(density·m)``).
        order: CABS' pruning order (None: the experts' order).
        last_group: CABS' rule for a tensor's last incomplete group (``"density"``, ``"pad"``, ``"drop"``: see
            :func:`lightning_merge.strategies.functional.last_group_quota`).
        overlap: CABS' rule for a group with fewer free positions than n: ``"fill"`` (complete n from the taken
            positions) or ``"free_only"`` (keep only the free ones).
        statistic: the statistic kind of ``"saliency"``.
        rescale: see the module docstring.
    """

    method: str = "none"
    density: float | Sequence[float] = 1.0
    gamma: float | Sequence[float] = 0.01
    epsilon: float | Sequence[float] = 0.15
    scope: str = "tensor"
    seed: int = 0
    n: int | None = None
    m: int = 256
    order: Sequence[int] | None = None
    last_group: str = "density"
    overlap: str = "fill"
    statistic: str = "exp_avg_sq"
    rescale: str = "none"

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.statistic,) if self.method == "saliency" else ()

    @property
    def sequential(self) -> bool:
        """An expert's mask depends on the earlier experts' (CABS)."""
        return self.method == "cabs"

    @property
    def global_pass(self) -> bool:
        return self.method == "magnitude" and self.scope == "model"

    @property
    def row_pass(self) -> bool:
        """Its rows can be sparsified once a pass over them has found what it needs of the whole tensor: a per-tensor
        top-k without rescaling (the cut), or a random drop (DARE, DELLA: the draws of a chunk are drawn alone, see
        :func:`~lightning_merge.strategies.functional.uniform_draws`; with the L1 rescale, a pass finds the factor)."""
        return (self.method == "magnitude" and self.scope == "tensor" and self.rescale == "none") or \
            self.method in ("random", "della")

    def keep_fraction(self, index: int) -> float:
        if self.method == "cabs":
            return self.cabs_n() / self.m
        return _value(self.density, index, 1.0)

    def cabs_n(self) -> int:
        return self.n if self.n is not None else round(float(_value(self.density, 0, 1.0)) * self.m)

    def is_identity(self, index: int) -> bool:
        """Whether expert ``index``'s task vector passes unchanged (no entry dropped, no rescale)."""
        if self.method == "none":
            return True
        if self.method == "cabs" or self.method == "saliency":
            return False
        if self.method == "breadcrumbs":
            return False
        return self.keep_fraction(index) >= 1.0

    def prepare(self, plan: MergePlan) -> dict[str, Any]:
        """Model-wide quantities (the model-wide top-k thresholds); empty for the other methods."""
        if not self.global_pass:
            return {}
        densities = [_value(self.density, i, 1.0) for i in range(plan.num_experts)]
        return {"cuts": model_topk_thresholds(plan, densities)}

    def mask(
        self, name: str, index: int, tau: Tensor, stats: Mapping[str, Tensor], ctx: Mapping[str, Any],
        taken: Tensor | None = None,
    ) -> Tensor | None:
        """Expert ``index``'s keep-mask of tensor ``name`` (None keeps everything). ``taken``: for CABS, the
        positions earlier experts took (None for the first)."""
        method = self.method
        if method == "none":
            return None
        density = self.keep_fraction(index)
        if method == "magnitude":
            if self.scope == "model" or name in ctx.get("cuts", ()):  # model-wide, or a row chunk's cut
                return ctx["cuts"][name][index].mask(tau)
            return F.magnitude_mask(tau, density)
        if method == "random":
            if density >= 1:
                return None
            return F.random_mask(tau.shape, density, F.tensor_seed(self.seed, name, index), _start(ctx, name))
        if method == "della":
            return self._della(name, index, tau, _start(ctx, name))[0]
        if method == "breadcrumbs":
            return F.breadcrumbs_mask(tau, density, _value(self.gamma, index, 0.01))
        if method == "saliency":
            score = stats[self.statistic] * tau.square()
            return F.topk_mask(score, F.keep_count(density, score.numel()))
        if method == "cabs":
            return F.nm_mask(tau, self.cabs_n(), self.m, None if taken is None else ~taken,
                             fill=self.overlap == "fill", last=self.last_group)
        raise ValueError(f"unknown sparsification {method!r}; known: {', '.join(SPARSIFIERS)}")

    def _della(self, name: str, index: int, tau: Tensor, start: int = 0) -> tuple[Tensor | None, Tensor | None]:
        """DELLA's keep-mask of expert ``index`` and the probabilities it was drawn with (None, None: keep all);
        ``tau`` holds the tensor's entries from flat index ``start`` on (whole rows)."""
        density = self.keep_fraction(index)
        if density >= 1:
            return None, None
        if density <= 0:
            return torch.zeros_like(tau, dtype=torch.bool), None
        epsilon = _value(self.epsilon, index, 0.15)
        check_della("Sparsification", density, epsilon)
        probs = F.della_probabilities(tau, density, epsilon)
        draws = F.uniform_draws(F.tensor_seed(self.seed, name, index), start, tau.numel()).view(tau.shape)
        return draws < probs, probs

    def apply(
        self, name: str, index: int, tau: Tensor, stats: Mapping[str, Tensor], ctx: Mapping[str, Any],
        taken: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Sparsify and rescale expert ``index``'s task vector ``tau`` in place.

        Returns:
            ``(tau, taken)``: the same tensor, and for CABS the positions taken so far (earlier experts' and this
            one's non-zero kept entries); None otherwise.
        """
        probs = None
        if self.method == "della":
            keep, probs = self._della(name, index, tau, _start(ctx, name))
        else:
            keep = self.mask(name, index, tau, stats, ctx, taken)
        factors = ctx.get("l1", {}).get(name)  # a row chunk's: the whole tensor's L1 factors, found by a pass
        if keep is not None and factors is not None:
            tau.mul_(keep)
            if factors[index] is not None:
                tau.mul_(factors[index])
        elif keep is not None:
            before = F.exact_l1(tau) if self.rescale == "l1" else None
            tau.mul_(keep)
            if self.rescale == "inverse" and probs is not None:  # DELLA: each kept entry ÷ its own probability
                tau.div_(probs)
            elif self.rescale == "inverse":
                fraction = self.keep_fraction(index)
                if fraction > 0:
                    tau.div_(fraction)
            elif before is not None:  # the masked task vector scaled back to its L1 norm, in place
                factor = F.l1_factor(before, F.exact_l1(tau))
                if factor is not None:
                    tau.mul_(factor)
        if self.sequential:
            mine = (keep if keep is not None else torch.ones_like(tau, dtype=torch.bool)) & (tau != 0)
            taken = mine if taken is None else taken | mine
        return tau, taken

    def apply_stack(
        self, name: str, buf: Tensor, stats: Sequence[Mapping[str, Tensor]], ctx: Mapping[str, Any]
    ) -> None:
        """Sparsify stacked task vectors ``buf (N, *shape)`` in place, in the pruning order."""
        if self.method == "none":
            return
        order = list(self.order) if self.order is not None and self.sequential else range(buf.shape[0])
        taken = None
        for i in order:
            _, taken = self.apply(name, i, buf[i], stats[i], ctx, taken)


def _start(ctx: Mapping[str, Any], name: str) -> int:
    """The flat index of the first entry of the rows being merged (0 for a whole tensor)."""
    return ctx.get("starts", {}).get(name, 0)


def random_chunks(plan: MergePlan, name: str, chunks: Sequence[tuple[int, int]],
                  sparsifier: Sparsification) -> list[dict[str, Any]]:
    """Per row chunk of tensor ``name``, what a random drop (DARE, DELLA) needs to sparsify the chunk alone as it
    sparsifies the whole tensor: the chunk's first flat index (its draws), and with the L1 rescale each expert's
    factor, from a pass over the chunks that adds the rows' L1 norms exactly (:func:`F.exact_l1`)."""
    row = math.prod(plan.spec(name).shape[1:])
    starts = [rows[0] * row for rows in chunks]
    factors = None
    if sparsifier.rescale == "l1":
        n = plan.num_experts
        before: list[list[float]] = [[] for _ in range(n)]
        after: list[list[float]] = [[] for _ in range(n)]
        for rows, start in zip(chunks, starts):
            base = plan.base_tensor(name, rows)
            ctx = {"starts": {name: start}}
            for i, expert in enumerate(plan.expert_tensors(name, base, rows)):
                tau = expert - base
                keep = sparsifier._della(name, i, tau, start)[0] if sparsifier.method == "della" else \
                    sparsifier.mask(name, i, tau, {}, ctx)
                before[i].extend(F.row_l1(tau))
                after[i].extend(F.row_l1(tau if keep is None else tau * keep))
                del tau, keep
        factors = [None if sparsifier.is_identity(i) else F.l1_factor(math.fsum(before[i]), math.fsum(after[i]))
                   for i in range(n)]
    return [{"starts": {name: start}, **({"l1": {name: factors}} if factors is not None else {})}
            for start in starts]


def check_della(owner: Any, density: Any, epsilon: Any) -> None:
    """Refuse a DELLA density ± epsilon outside (0, 1) where entries are dropped (0 < density < 1): the keep
    probabilities would leave [0, 1] (mergekit refuses the same recipes, when it reaches the tensor).

    Raises:
        ValueError: naming ``owner``'s density and epsilon, and the range they must keep.
    """
    who = owner if isinstance(owner, str) else owner.__name__
    densities = density if isinstance(density, (list, tuple)) else [density]
    epsilons = epsilon if isinstance(epsilon, (list, tuple)) else [epsilon] * len(densities)
    if len(epsilons) == 1 and len(densities) > 1:
        epsilons = epsilons * len(densities)
    for i, (d, e) in enumerate(zip(densities, epsilons)):
        if isinstance(e, bool) or not isinstance(e, (int, float)) or e != e:
            raise ValueError(f"{who}.epsilon must be a number or a list of numbers, got {e!r}")
        if 0 < d < 1 and not (d - abs(e) > 0 and d + abs(e) < 1):
            which = f" (expert {i + 1})" if len(densities) > 1 else ""
            raise ValueError(f"{who}: density {d:g} ± epsilon {e:g}{which} must stay inside (0, 1): DELLA keeps each "
                             "entry with a probability in [density − epsilon, density + epsilon]; lower epsilon")


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

    def high_histogram(name: str) -> Tensor:
        b = bits_of(name)
        return torch.stack([torch.bincount((b[i] >> 16).clamp_(0, (1 << 15) - 1), minlength=1 << 15)
                            for i in range(n_experts)])

    hist = plan.sum(high_histogram, "top-k thresholds (1/2)", torch.zeros(n_experts, 1 << 15, dtype=torch.int64))
    at_or_above = hist.flip(1).cumsum(1).flip(1)
    bins = []
    for i in range(n_experts):
        k = ks[i]
        idx = torch.nonzero(at_or_above[i] >= k).flatten() if k > 0 else torch.tensor([], dtype=torch.int64)
        bins.append(int(idx.max()) if len(idx) else -1)

    def low(name: str) -> list[Tensor]:
        b = bits_of(name)
        return [(b[i][(b[i] >> 16) == bins[i]] & 0xFFFF) if bins[i] >= 0 else torch.empty(0, dtype=torch.int32)
                for i in range(n_experts)]

    low_bits: dict[str, list[Tensor]] = plan.map(low, "top-k thresholds (2/2)")

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


def tensor_topk_cuts(plan: MergePlan, name: str, chunks: Sequence[tuple[int, int]],
                     densities: list[float]) -> list[list[_GlobalCut]]:
    """Per row chunk and expert, the cut that keeps in that chunk exactly the entries :func:`F.magnitude_mask` keeps of
    the whole tensor ``name``: its top ``keep_count(density, numel)`` of |τᵢ| (ties at the threshold by the lower flat
    index; every non-zero entry when the threshold is 0). Three passes over the chunks: a histogram of the float32
    bits' high 16, then of the low 16 inside the threshold's bin, then each chunk's count of entries equal to the
    threshold (the ties before a chunk set its quota). Only the histograms outlive a chunk, allocated before the
    passes: small tensors kept between the chunks' large ones would pin the allocator's heap (measured: 224 MiB held
    after the passes over a 256 MiB tensor when each chunk's bin entries were kept)."""
    n = plan.num_experts
    numel = plan.spec(name).numel
    ks = [F.keep_count(d, numel) if d < 1 else numel for d in densities]
    high = torch.zeros(n, 1 << 15, dtype=torch.int64)
    low = torch.zeros(n, 1 << 16, dtype=torch.int64)
    nonzero = [0] * n

    def bits(rows: tuple[int, int]) -> Tensor:
        base = plan.base_tensor(name, rows)
        taus = [t - base for t in plan.expert_tensors(name, base, rows)]
        return torch.stack(taus).abs_().contiguous().view(torch.int32).reshape(n, -1)

    for rows in chunks:
        b = bits(rows)
        for i in range(n):
            high[i] += torch.bincount((b[i] >> 16).clamp_(0, (1 << 15) - 1), minlength=1 << 15)
            nonzero[i] += int(torch.count_nonzero(b[i]))
    at_or_above = high.flip(1).cumsum(1).flip(1)
    partial = [0 < ks[i] < nonzero[i] and ks[i] < numel for i in range(n)]  # a threshold above 0 to find
    bins = [int(torch.nonzero(at_or_above[i] >= ks[i]).flatten().max()) if partial[i] else -1 for i in range(n)]
    if any(partial):
        for rows in chunks:
            b = bits(rows)
            for i in range(n):
                if partial[i]:
                    low[i] += torch.bincount((b[i][(b[i] >> 16) == bins[i]] & 0xFFFF).to(torch.int64),
                                             minlength=1 << 16)
    thresholds, greater = [0] * n, [0] * n
    for i in range(n):
        if partial[i]:
            above_bin = int(at_or_above[i, bins[i] + 1]) if bins[i] + 1 < (1 << 15) else 0
            lo_at_or_above = low[i].flip(0).cumsum(0).flip(0)
            lo = int(torch.nonzero(lo_at_or_above >= ks[i] - above_bin).flatten().max())
            thresholds[i] = (bins[i] << 16) | lo
            greater[i] = above_bin + (int(lo_at_or_above[lo + 1]) if lo + 1 < (1 << 16) else 0)
    equal = [[0] * n for _ in chunks]
    if any(partial):
        for c, rows in enumerate(chunks):
            b = bits(rows)
            for i in range(n):
                if partial[i]:
                    equal[c][i] = int((b[i] == thresholds[i]).sum())
    remaining = [ks[i] - greater[i] for i in range(n)]
    per_chunk: list[list[_GlobalCut]] = []
    for c in range(len(chunks)):
        cuts = []
        for i in range(n):
            if not partial[i]:
                # magnitude_mask's shortcuts: everything, nothing, or every non-zero entry (the threshold is 0)
                cuts.append(_GlobalCut(0, 0, keep_all=densities[i] >= 1, keep_none=ks[i] <= 0 < nonzero[i]))
                continue
            quota = max(0, min(remaining[i], equal[c][i]))
            remaining[i] -= quota
            cuts.append(_GlobalCut(thresholds[i], quota))
        per_chunk.append(cuts)
    return per_chunk


__all__ = ["RESCALES", "SCOPES", "SPARSIFIERS", "Sparsification", "check_della", "model_topk_thresholds",
           "tensor_topk_cuts"]
