"""PCB-merging, parameter competition balancing (Du et al., NeurIPS 2024), as the authors' reference code computes it.

Over the whole model, per expert i (τᵢ its task vector, n experts, d entries, quantiles taken over the model):

1. clamp |τᵢ| to its [``clamp_ratio``, 1 − ``clamp_ratio``] quantiles (the reference's ``sorted[int(d·r)]`` and
   ``sorted[int(d·(1 − r)) − 1]``): aᵢ; τ̃ᵢ = sign(τᵢ)·aᵢ;
2. intra-balancing: sᵢ = exp(n · ((aᵢ − min aᵢ) / (max aᵢ − min aᵢ))²);
3. inter-balancing: cᵢ = tanh(τᵢ · Σⱼ τⱼ) (elementwise, unclamped task vectors);
4. pᵢ = sᵢ · cᵢ; keep the top ``ratio`` of pᵢ over the model: ωᵢ = (max(pᵢ, qᵢ) − qᵢ) / (max pᵢ − qᵢ), qᵢ the
   reference's ``sorted[int(d·(1 − ratio))]`` (entries below qᵢ get weight 0);
5. τ* = Σᵢ ωᵢ τ̃ᵢ / max(Σᵢ ωᵢ, 1e-12); θ = θ₀ + scale · τ*.

The model-wide quantiles (four per expert) are exact: two streaming passes of 16-bit radix histograms over the
order-preserving integer keys of the float32 values, for |τ| and then for p (so five reads of the experts in all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_merge.strategies.base import Prepared, Strategy
from lightning_merge.strategies.checks import check_number
from lightning_merge.strategies.registry import Reference

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

_BINS = 1 << 16


def _keys(values: Tensor) -> Tensor:
    """Order-preserving unsigned keys (int64 in [0, 2³²)) of float32 values: a < b ⇔ key(a) < key(b)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    flipped = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats order backwards in their low bits
    return flipped + (1 << 31)


def _float_of(key: int) -> float:
    signed = key - (1 << 31)
    bits = signed ^ 0x7FFFFFFF if signed < 0 else signed
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def model_order_statistics(plan: MergePlan, values: Callable[[str], Tensor], ranks: Sequence[Sequence[int]],
                           desc: str) -> list[list[float]]:
    """Exact order statistics over the whole model, per expert: ``out[i][j]`` is the ``ranks[i][j]``-th smallest
    (0-based) of expert i's values, where ``values(name)`` gives an (n_experts, numel) float32 tensor per merged tensor.

    Two streaming passes: a histogram of the high 16 bits of the order-preserving keys, then, for the bins holding
    the requested ranks, histograms of the low 16 bits. Exact in any order of summation (integer counts), so it splits
    over the ranks of a distributed merge.
    """
    n = len(ranks)
    width = max(len(r) for r in ranks)

    def high(name: str) -> Tensor:
        keys = _keys(values(name))
        return torch.stack([torch.bincount(keys[i] >> 16, minlength=_BINS) for i in range(n)])

    hist = plan.sum(high, f"{desc} (1/2)", torch.zeros(n, _BINS, dtype=torch.int64))
    cum = hist.cumsum(1)
    bins = torch.zeros(n, width, dtype=torch.int64)
    before = torch.zeros(n, width, dtype=torch.int64)
    for i, wanted in enumerate(ranks):
        for j, r in enumerate(wanted):
            b = int(torch.searchsorted(cum[i], torch.tensor(r, dtype=torch.int64), right=True))
            bins[i, j] = b
            before[i, j] = int(cum[i, b - 1]) if b > 0 else 0

    def low(name: str) -> Tensor:
        keys = _keys(values(name))
        out = torch.zeros(n, width, _BINS, dtype=torch.int64)
        for i in range(n):
            high_bits = keys[i] >> 16
            for j in range(len(ranks[i])):
                chosen = keys[i][high_bits == bins[i, j]] & 0xFFFF
                out[i, j] = torch.bincount(chosen, minlength=_BINS)
        return out

    lows = plan.sum(low, f"{desc} (2/2)", torch.zeros(n, width, _BINS, dtype=torch.int64))
    result: list[list[float]] = []
    for i, wanted in enumerate(ranks):
        row = []
        for j, r in enumerate(wanted):
            residual = r - int(before[i, j])
            lo = int(torch.searchsorted(lows[i, j].cumsum(0), torch.tensor(residual, dtype=torch.int64), right=True))
            row.append(_float_of((int(bins[i, j]) << 16) | lo))
        result.append(row)
    return result


@dataclasses.dataclass(frozen=True)
class PCB(Strategy):
    """PCB-merging: each entry of each task vector weighted by its importance within the task (intra-balancing)
    and its agreement with the other tasks (inter-balancing); the least important entries dropped (see the module
    docstring for the exact steps).

    Args:
        ratio: the fraction of each expert's entries kept (the reference's ``pcb_ratio`` / ``K``; 0.1 in the paper's
            vision experiments, 0.05 in TSV-M's benchmark).
        clamp_ratio: the outlier fraction clamped at each end of |τ| before the intra-balancing (the reference's
            ``min_ratio`` = ``max_ratio`` = 0.0001).
        scale: λ, the step along the merged task vector (the reference's ``scaling_factor``, tuned on validation).
    """

    name = "pcb"
    reference = Reference("https://arxiv.org/abs/2410.02396", ("https://github.com/duguodong7/pcb-merging",))
    scalable = True
    global_pass = True

    ratio: float = 0.1
    clamp_ratio: float = 0.0001
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_number(type(self), "ratio", self.ratio, low=0.0, high=1.0)
        if not self.ratio > 0:
            raise ValueError(f"PCB.ratio must be in (0, 1], got {self.ratio!r}")
        check_number(type(self), "clamp_ratio", self.clamp_ratio, low=0.0, high=0.5)
        if not self.clamp_ratio < 0.5:
            raise ValueError(f"PCB.clamp_ratio must be in [0, 0.5), got {self.clamp_ratio!r}")
        check_number(type(self), "scale", self.scale)

    def prepare(self, plan: MergePlan) -> Prepared:
        self.check_num_experts(plan.num_experts)
        n = plan.num_experts
        d = sum(plan.spec(name).numel for name in plan.names)
        if d == 0:
            return Prepared(self, n, low=[0.0] * n, high=[0.0] * n, cut=[0.0] * n, top=[0.0] * n)
        low_rank, high_rank = int(d * self.clamp_ratio), max(0, int(d * (1 - self.clamp_ratio)) - 1)
        bounds = model_order_statistics(
            plan, lambda name: plan.task_vectors(name).reshape(n, -1).abs(), [[low_rank, high_rank]] * n,
            "PCB |τ| quantiles")
        low, high = [b[0] for b in bounds], [b[1] for b in bounds]
        cut_rank = min(d - 1, int(d * (1 - self.ratio)))
        stats = model_order_statistics(
            plan, lambda name: self._competition(plan.task_vectors(name).reshape(n, -1), low, high)[0],
            [[cut_rank, d - 1]] * n, "PCB competition quantiles")
        return Prepared(self, n, low=low, high=high, cut=[s[0] for s in stats], top=[s[1] for s in stats])

    @staticmethod
    def _competition(taus: Tensor, low: Sequence[float], high: Sequence[float]) -> tuple[Tensor, Tensor]:
        """(p, τ̃): the balanced competition scores and the clamped task vectors, for (n, m) task vectors."""
        n = taus.shape[0]
        lo = torch.tensor(low, dtype=taus.dtype).unsqueeze(1)
        hi = torch.tensor(high, dtype=taus.dtype).unsqueeze(1)
        magnitude = torch.minimum(torch.maximum(taus.abs(), lo), hi)
        clamped = torch.sign(taus) * magnitude
        intra = torch.exp(n * ((magnitude - lo) / (hi - lo).clamp_min(torch.finfo(taus.dtype).tiny)) ** 2)
        inter = torch.tanh(taus * taus.sum(0, keepdim=True))
        return intra * inter, clamped

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        prepared = prepared if prepared is not None else self._unprepared(n)
        taus = torch.stack([t - base for t in tensors]).reshape(n, -1)
        scores, clamped = self._competition(taus, prepared["low"], prepared["high"])
        cut = torch.tensor(prepared["cut"], dtype=taus.dtype).unsqueeze(1)
        top = torch.tensor(prepared["top"], dtype=taus.dtype).unsqueeze(1)
        weight = (torch.maximum(scores, cut) - cut) / (top - cut).clamp_min(torch.finfo(taus.dtype).tiny)
        merged = (clamped * weight).sum(0) / weight.sum(0).clamp_min(1e-12)
        return merged.reshape(base.shape).mul_(self.scale).add_(base)


__all__ = ["PCB", "model_order_statistics"]
