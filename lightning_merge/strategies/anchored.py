"""Merges anchored on the base, as mergekit 0.1.5 defines them: :class:`ModelStock` (the experts' average pulled
toward the base by the angle between their task vectors), :class:`NearSwap` (the expert's weight only where it is
near the base's) and :class:`ArceeFusion` (the expert's change only where it is important).

Each rule is per tensor, float32, deterministic; none is linear in the experts, has a ``scale``, or folds experts
one at a time (docs/strategies.md says why for each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies.base import ContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_bool, check_expert_count, check_number
from lightning_merge.strategies.registry import MERGEKIT, Reference


def model_stock_ratio(taus: Sequence[Tensor]) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos θ / (1 + (N−1) cos θ)`` per vector along the last axis, with
    ``cos θ`` the mean over pairs of experts of the cosine between their task vectors (the product of two norms
    clamped to at least 1e-6); ``t = 0`` (the base) where ``|1 + (N−1) cos θ| < 1e-6``. Shape: ``(*lead, 1)``."""
    count = len(taus)
    norms = [torch.linalg.vector_norm(tau, dim=-1) for tau in taus]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(count):
        for j in range(i + 1, count):
            product = (norms[i] * norms[j]).clamp(min=1e-6)
            # the dot products without a product tensor (8.7x faster than (a * b).sum on 16M entries)
            total += (torch.linalg.vecdot(taus[i], taus[j], dim=-1) / product).clamp(-1.0, 1.0)
            pairs += 1
    cos = (total / pairs).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


@dataclasses.dataclass(frozen=True)
class ModelStock(Strategy):
    """Model Stock (Jang et al., ECCV 2024), mergekit's ``model_stock``: ``θ = t · mean(θᵢ) + (1 − t) · θ₀`` with
    ``t = N cos θ / (1 + (N−1) cos θ)`` from the mean pairwise cosine of the task vectors
    (:func:`model_stock_ratio`): per tensor, or per filter (each vector along the last axis: a weight's rows; a 1-D
    tensor as one) with ``filter_wise``.

    Args:
        filter_wise: one ratio per filter instead of per tensor (mergekit's name and default, False).
    """

    name = "model_stock"
    reference = Reference("https://arxiv.org/abs/2403.19522",
                          ("https://github.com/naver-ai/model-stock", MERGEKIT + "model_stock.py"))

    filter_wise: bool = False

    def __post_init__(self) -> None:
        check_bool(type(self), "filter_wise", self.filter_wise)

    def check_num_experts(self, num_experts: int) -> None:
        check_expert_count(type(self), num_experts, 2, None, "its ratio is the angle between two or more "
                           "fine-tuned models (mergekit: the base and at least two models)")

    @property
    def row_local(self) -> bool:
        """``filter_wise``: one ratio per row (of a tensor of two or more dimensions); otherwise one per tensor."""
        return self.filter_wise

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        self.check_num_experts(len(tensors))
        if self.filter_wise:
            view = (lambda x: x.unsqueeze(0)) if base.dim() <= 1 else (lambda x: x)
        else:
            view = (lambda x: x.reshape(-1))  # noqa: E731
        b = view(base)
        ws = [view(t) for t in tensors]
        t = model_stock_ratio([w - b for w in ws])
        average = ws[0] + ws[1]  # (the same floats as a clone of the first plus each other, with one pass less)
        for w in ws[2:]:
            average += w
        average /= len(ws)
        # t · average + (1 − t) · base, in place: the same roundings, two temporaries fewer
        return average.mul_(t).add_(b.mul(1 - t)).reshape(base.shape)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'model_stock' has no continual form: its ratio averages the angle between "
                              "every pair of task vectors and depends on their count; use linear or task_arithmetic "
                              "for a continual state")


@dataclasses.dataclass(frozen=True)
class NearSwap(Strategy):
    """NearSwap, mergekit's ``nearswap``: take the expert's weight where it is near the base's.
    ``θ = w θ₁ + (1 − w) θ₀`` with ``w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1)``: the expert's value where the two
    differ by at most ``t``, the base's pulled toward it by ``t`` elsewhere.

    Args:
        t: the similarity threshold, in weight units (mergekit's ``t``, which a recipe must give; 1e-4 by default in
            Python, the value of the method's reference model). Must be ≥ 0.
    """

    name = "nearswap"
    reference = Reference("https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", (MERGEKIT + "nearswap.py",))

    t: float = 1e-4

    def __post_init__(self) -> None:
        check_number(type(self), "t", self.t, low=0.0)

    def check_num_experts(self, num_experts: int) -> None:
        check_expert_count(type(self), num_experts, 1, 1, "nearswap moves the base toward one model")

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        self.check_num_experts(len(tensors))
        expert = tensors[0]
        weight = (self.t / (base - expert).abs_().clamp_(min=1e-6)).clamp_(0.0, 1.0)
        return weight * expert + (1 - weight) * base

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'nearswap' has no continual form: it moves the base toward exactly one "
                              "expert; merge the expert with merge()")


def fusion_importance(expert: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance of each entry: ``|θ₁ − θ₀| · KL(p ‖ q)`` where ``p``, ``q`` are the softmaxes of
    the expert's and the base's vectors along the last axis (+1e-8) and KL is summed along it (one value per vector)."""
    p = torch.softmax(expert, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (expert - base).abs_() * kl


def fusion_threshold(importance: Tensor) -> Tensor:
    """``median + 1.5 (Q₃ − Q₁)`` of the importances, each quantile the ``⌊q (n−1)⌋``-th smallest of all ``n``
    entries (mergekit's rule; mergekit estimates it from a random sample of 1,000,000 entries when a tensor has
    more, this is exact)."""
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (flat.kthvalue(k + 1).values for k in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


@dataclasses.dataclass(frozen=True)
class ArceeFusion(Strategy):
    """Arcee Fusion, mergekit's ``arcee_fusion``: the expert's change where it is important, the base elsewhere.
    ``θ = θ₀ + 1[s ≥ median(s) + 1.5 IQR(s)] ⊙ (θ₁ − θ₀)`` with ``s`` the importance of :func:`fusion_importance`
    and the threshold of :func:`fusion_threshold`. Takes no argument.
    """

    name = "arcee_fusion"
    reference = Reference("https://arcee.ai", (MERGEKIT + "arcee_fusion.py",))

    def check_num_experts(self, num_experts: int) -> None:
        check_expert_count(type(self), num_experts, 1, 1, "arcee_fusion fuses one model into the base")

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        self.check_num_experts(len(tensors))
        expert = tensors[0]
        shape = base.shape
        if base.dim() == 0:
            base, expert = base.reshape(1), expert.reshape(1)
        importance = fusion_importance(expert, base)
        keep = importance >= fusion_threshold(importance)
        return (base + (expert - base) * keep).reshape(shape)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'arcee_fusion' has no continual form: it fuses exactly one expert into the "
                              "base; merge the expert with merge()")


__all__ = ["ArceeFusion", "ModelStock", "NearSwap", "fusion_importance", "fusion_threshold", "model_stock_ratio"]
