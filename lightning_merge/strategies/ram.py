"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local): entries only one expert changed are kept whole, entries
several experts changed are averaged over those experts (mergekit's ``ram`` and ``ramplus_tl``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies.base import ContinualForm, ContinualSummary, FoldContext, Prepared, Strategy
from lightning_merge.strategies.checks import check_number
from lightning_merge.strategies.registry import MERGEKIT, Reference

_PAPER = "https://arxiv.org/abs/2601.13572"


@dataclasses.dataclass(frozen=True)
class RAM(Strategy):
    """RAM: an entry is changed by an expert where ``|τᵢ| > epsilon``;
    ``θ = θ₀ + scale · Σᵢ [|τᵢ| > ε] τᵢ / max(c, 1)`` with ``c`` the number of experts that changed the entry (so an
    entry one expert changed keeps its change, and one several changed gets their mean). mergekit's ``ram``.

    Args:
        epsilon: the magnitude above which an entry counts as changed.
        scale: the step along the merged task vector (an extension: mergekit has none; 1 is its merge).
    """

    name = "ram"
    reference = Reference(_PAPER, (MERGEKIT + "ram.py",))
    scalable = True

    epsilon: float = 1e-5
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_number(type(self), "epsilon", self.epsilon, low=0.0)
        check_number(type(self), "scale", self.scale)

    row_local = True  # the changed entries are counted entry by entry

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        tau = torch.stack([t - base for t in tensors])
        changed = tau.abs() > self.epsilon
        counts = changed.sum(dim=0).clamp_(min=1)
        merged = (tau * changed / counts).sum(dim=0)
        return merged.mul_(self.scale).add_(base)

    def continual_form(self) -> ContinualForm:
        return _RAMFold(self)


class _RAMFold(ContinualForm):
    """RAM folded one expert at a time: the running Σᵢ [|τᵢ| > ε] τᵢ and the count of experts that changed each
    entry; the merge divides one by the other."""

    quantities = (("sum", torch.float32), ("count", torch.int32))
    row_local = True

    def __init__(self, strategy: RAM):
        self.strategy = strategy

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return FoldContext(index, 1.0)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        changed = tau.abs() > self.strategy.epsilon
        kept = tau.mul_(changed)
        if running is None:
            return {"sum": kept, "count": changed.to(torch.int32)}
        return {"sum": running["sum"].add_(kept), "count": running["count"].add_(changed)}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        merged = running["sum"] / running["count"].clamp(min=1)
        return merged.mul_(self.strategy.scale).add_(base)


@dataclasses.dataclass(frozen=True)
class RAMPlusTL(Strategy):
    """RAM+ (tensor-local): RAM whose unique entries are amplified per expert and tensor. With ``sᵢ`` and ``uᵢ`` the
    numbers of entries of the tensor that expert i changed and that other experts changed too (shared) or did not
    (unique), ``λᵢ = 1 + r · clamp(sᵢ / max(uᵢ, ε), 0, alpha)`` multiplies expert i's unique entries; shared entries
    are averaged as in :class:`RAM`. mergekit's ``ramplus_tl``.

    Args:
        r: the amplification rate.
        alpha: the cap on the shared-to-unique ratio.
        epsilon: the magnitude above which an entry counts as changed (and the floor of ``uᵢ``).
        scale: the step along the merged task vector (an extension: mergekit has none; 1 is its merge).
    """

    name = "ramplus_tl"
    reference = Reference(_PAPER, (MERGEKIT + "ram.py",))
    scalable = True

    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5
    scale: float = 1.0

    def __post_init__(self) -> None:
        owner = type(self)
        check_number(owner, "r", self.r)
        check_number(owner, "alpha", self.alpha)
        check_number(owner, "epsilon", self.epsilon, low=0.0)
        check_number(owner, "scale", self.scale)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm(
            "strategy 'ramplus_tl' has no continual form: each expert's amplification counts the entries other experts "
            "also changed, which later experts change; use 'ram', which folds"
        )

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        tau = torch.stack([t - base for t in tensors]).reshape(n, -1)
        changed = tau.abs() > self.epsilon
        counts = changed.sum(dim=0, keepdim=True)
        unique = counts == 1
        shared = changed & (counts > 1)
        rho = shared.sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=self.epsilon)
        amplify = 1 + self.r * rho.clamp(min=0, max=self.alpha)
        kept = tau * changed
        merged = (kept * unique * amplify.unsqueeze(-1) + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
        return merged.view(base.shape).mul_(self.scale).add_(base)


__all__ = ["RAM", "RAMPlusTL"]
