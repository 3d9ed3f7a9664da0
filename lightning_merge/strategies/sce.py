"""SCE (Select, Calculate, Erase; FuseChat 2.0): keep the entries where the experts' task vectors vary most, weight
each expert by its mean squared task vector, erase the entries whose sign disagrees with the elected one, and take
the weighted mean of what remains (mergekit's ``sce``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies.base import ContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_number
from lightning_merge.strategies.registry import MERGEKIT, Reference


def sce_select(tau: Tensor, fraction: float) -> Tensor:
    """SCE's select step: the mask of the ``int(fraction · m)`` entries of largest variance across experts, where
    ``m`` counts the entries whose variance is non-zero (``tau (N, *shape)``; mergekit's ``sce_mask``)."""
    if fraction >= 1:
        return torch.ones(tau.shape[1:], dtype=torch.bool)
    var = tau.var(dim=0, unbiased=False)
    # the count times the fraction in float32, as mergekit's tensor arithmetic computes it (2670 · 0.7 gives 1869
    # there, 1868.9999999999998 in float64)
    k = int(torch.count_nonzero(var) * fraction) if fraction > 0 else 0
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(var.reshape(-1), k).indices] = True
    return mask.view(var.shape)


def sce_weights(tau: Tensor) -> Tensor:
    """SCE's calculate step: each expert's mean squared task vector over their sum (uniform when the sum is below
    1e-6)."""
    w = tau.reshape(tau.shape[0], -1).square().mean(dim=1)
    total = float(w.sum())
    if abs(total) < 1e-6:
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


@dataclasses.dataclass(frozen=True)
class SCE(Strategy):
    """SCE: ``θ = θ₀ + scale · Σᵢ wᵢ mᵢ τᵢ' / max(Σᵢ wᵢ mᵢ, 1e-6)``, where ``τᵢ'`` is τᵢ on the selected entries (the
    top ``select_topk`` fraction of entries by variance across experts, per tensor), ``wᵢ`` is ``mean(τᵢ'²)``
    normalised to sum to 1 over the experts (per tensor), and ``mᵢ`` keeps the entries whose sign equals the sign of
    ``Σᵢ τᵢ'`` (non-negative sums elect +; zero entries never agree). mergekit's ``sce`` (FuseChat's rule); experts
    take no weights.

    Args:
        select_topk: the fraction of entries (among those whose variance is non-zero) kept in the select step;
            1 keeps every entry.
        scale: the step along the merged task vector (an extension: mergekit has none; 1 is its merge).
    """

    name = "sce"
    reference = Reference("https://arxiv.org/abs/2408.07990",
                          ("https://github.com/fanqiwan/FuseAI", MERGEKIT + "sce.py"))
    scalable = True

    select_topk: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_number(type(self), "select_topk", self.select_topk, low=0.0, high=1.0)
        check_number(type(self), "scale", self.scale)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm(
            "strategy 'sce' has no continual form: its selection compares the variance across every expert, and its "
            "weights and sign election are normalised over all of them at once; merge the set in one go, or fold "
            "with task_arithmetic or dare"
        )

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        tau = torch.stack([t - base for t in tensors])
        if self.select_topk < 1:
            tau.mul_(sce_select(tau, self.select_topk))
        elected = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0)
        weights = sce_weights(tau).view(-1, *[1] * (tau.dim() - 1))
        erased = weights * (torch.sign(tau) == elected)
        merged = (tau * erased).sum(dim=0).div_(erased.sum(dim=0).clamp_(min=1e-6))
        return merged.mul_(self.scale).add_(base)


__all__ = ["SCE", "sce_select", "sce_weights"]
