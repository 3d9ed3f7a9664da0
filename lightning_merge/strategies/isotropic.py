"""Isotropic merging (Marczak et al., ICML 2025, "No task left behind"): ISO-C and ISO-CTS, as FusionBench 0.2.33's
``isotropic_merging`` (the authors' code, danielm1405/iso-merging, ported) computes them.

Per 2-D tensor (a linear layer's weight), with N experts, task vectors τᵢ and r = min(rows, cols):

- **ISO-C**: the task-arithmetic sum M = Σ τᵢ = U Σ Vᵀ (thin SVD) gets a flat spectrum, τ* = σ̄ U Vᵀ with σ̄ the mean
  of its r singular values.
- **ISO-CTS**: the common subspace is M's leading k singular triplets; each task vector, with its component in the
  common left subspace removed (τᵢ − U_k U_kᵀ τᵢ), gives its leading s triplets; the k + N·s = r triplets are placed
  side by side, U and V replaced by their nearest orthogonal matrices (polar factors, as TSV-M), and the spectrum
  flattened to the mean of the r gathered singular values: τ* = σ̄ U⊥ V⊥ᵀ. k and s follow the reference:
  k₀ = ⌊r·f⌋, N·s = round((r − k₀)/N)·N (Python's round, halves to even), k = r − N·s.

Every other tensor (biases, norms, and 2-D tensors matched by ``not_svd``) takes the mean of the task vectors.
θ = θ₀ + scale · τ*.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.strategies.base import ContinualForm, ContinualSummary, FoldContext, Prepared, Strategy
from lightning_merge.strategies.checks import check_number, check_pattern
from lightning_merge.strategies.functional import ranked_svd
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

ISO_PAPER = "https://arxiv.org/abs/2502.04959"
ISO_CODE = ("https://github.com/danielm1405/iso-merging", FUSION_BENCH + "isotropic_merging")


def matrix_rule(name: str, tensor: Tensor, not_svd: str | None) -> bool:
    """Whether tensor ``name`` goes through a matrix rule: 2-D and not matched by ``not_svd``."""
    return tensor.dim() == 2 and (not_svd is None or re.search(not_svd, name) is None)


def _polar(m: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows): P Qᵀ of m = P S Qᵀ, over m's numerical rank (a
    zero column of m, a direction that a low-rank expert does not have, stays zero instead of taking a direction
    the SVD picks freely; for m of full rank, the polar factor itself)."""
    p, _, qh = ranked_svd(m)
    return p @ qh


def iso_c(total: Tensor) -> Tensor:
    """ISO-C of the task-arithmetic sum ``total`` (2-D, float32): its singular values replaced by their mean, over
    its numerical rank."""
    u, s, vh = ranked_svd(total)
    return (u * s.mean()) @ vh


def cts_split(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(k, s): the common subspace's size and each task's, k + n·s = r, as the reference rounds them.

    Where the reference's rounding would ask for more task directions than there are (n·s > r, only when r is
    below about n / (2(1 − f))), s is cut to ⌊r/n⌋ (the reference would slice with a negative k)."""
    k = int(r * fraction)
    per_task = round((r - k) / n)
    if per_task * n > r:
        per_task = r // n
    return r - per_task * n, per_task


def iso_cts(taus: Sequence[Tensor], fraction: float) -> Tensor:
    """ISO-CTS of N same-shaped 2-D task vectors (float32); see the module docstring."""
    n = len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    k, per_task = cts_split(r, n, fraction)
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    u, s, vh = ranked_svd(total)
    common_u = u[:, :k]
    gathered_u = total.new_zeros(rows, r)
    gathered_s = total.new_zeros(r)
    gathered_vh = total.new_zeros(r, cols)
    for i, tau in enumerate(taus):
        specific = tau - common_u @ (common_u.T @ tau)
        ui, si, vhi = ranked_svd(specific, scale=torch.linalg.vector_norm(tau))  # noise where nothing is left
        block = slice(i * per_task, (i + 1) * per_task)
        gathered_u[:, block] = ui[:, :per_task]
        gathered_s[block] = si[:per_task]
        gathered_vh[block] = vhi[:per_task]
    gathered_u[:, n * per_task:] = common_u
    gathered_s[n * per_task:] = s[:k]
    gathered_vh[n * per_task:] = vh[:k]
    return (_polar(gathered_u) * gathered_s.mean()) @ _polar(gathered_vh)


def _sum(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """Σ (tᵢ − base), accumulated in expert order (the continual fold adds in the same order)."""
    total = tensors[0] - base
    for t in tensors[1:]:
        total += t - base
    return total


@dataclasses.dataclass(frozen=True)
class IsoC(Strategy):
    """ISO-C: the sum of the task vectors with a flat singular spectrum, per 2-D tensor (see the module docstring).

    Args:
        scale: λ, the step along the merged task vector (FusionBench's ``scaling_factor``, 1.0 in its configuration;
            the paper chooses it on validation data).
        not_svd: a regular expression of 2-D tensor names merged by the mean instead (the reference's
            ``exclude_keys``, which names tensors exactly, e.g. ``r"lm_head|embed_tokens"``); None: every 2-D tensor
            goes through the SVD.
    """

    name = "iso_c"
    reference = Reference(ISO_PAPER, ISO_CODE)
    scalable = True

    scale: float = 1.0
    not_svd: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "scale", self.scale)
        check_pattern(type(self), "not_svd", self.not_svd)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        return self.from_sum(name, base, _sum(tensors, base), len(tensors))

    def from_sum(self, name: str, base: Tensor, total: Tensor, count: int) -> Tensor:
        """The merged tensor from the sum of ``count`` task vectors (consumed): ISO-C of the sum (a 2-D tensor
        through the SVD) or the mean, scaled and added to the base. The batch merge and the continual fold's finish
        both end here."""
        merged = iso_c(total) if matrix_rule(name, base, self.not_svd) else total.div_(count)
        return merged.mul_(self.scale).add_(base)

    def working_set(self, num_experts: int) -> float:
        """The inputs, the running sum and the SVD's U, Vᵀ and product (square matrices counted whole)."""
        return num_experts + 6

    def continual_form(self) -> ContinualForm:
        """Σ τᵢ per tensor: the SVD runs on the running sum when the model is written, so adding experts one at a
        time gives the batch merge."""
        return _IsoCFold(self)


class _IsoCFold(ContinualForm):
    """Σ τ per tensor; finish: ISO-C of the sum (2-D tensors) or the mean."""

    quantities = (("sum", torch.float32),)

    def __init__(self, strategy: IsoC):
        self.strategy = strategy

    def working_set(self, kinds: int) -> float:
        """The fold's copies plus the SVD's at finish: U, Vᵀ and their product."""
        return super().working_set(kinds) + 3

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return FoldContext(index, 1.0)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        return {"sum": tau.clone() if running is None else running["sum"] + tau}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        return self.strategy.from_sum(name, base, running["sum"].clone(), summary.count)


@dataclasses.dataclass(frozen=True)
class IsoCTS(Strategy):
    """ISO-CTS: a common subspace from the summed task vectors and a task-specific one per expert, whitened and with
    a flat spectrum, per 2-D tensor (see the module docstring).

    Args:
        common_space_fraction: f, the share of the r = min(rows, cols) directions kept for the common subspace
            before rounding (0.8: the paper's and FusionBench's default); 1 leaves no task-specific directions and
            is ISO-C.
        scale: λ, the step along the merged task vector (FusionBench's ``scaling_factor``, 1.0 in its configuration;
            the paper chooses it on validation data).
        not_svd: a regular expression of 2-D tensor names merged by the mean instead (the reference's
            ``exclude_keys``); None: every 2-D tensor goes through the SVD.
    """

    name = "iso_cts"
    reference = Reference(ISO_PAPER, ISO_CODE)
    scalable = True

    common_space_fraction: float = 0.8
    scale: float = 1.0
    not_svd: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "common_space_fraction", self.common_space_fraction, low=0, high=1)
        check_number(type(self), "scale", self.scale)
        check_pattern(type(self), "not_svd", self.not_svd)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        if matrix_rule(name, base, self.not_svd):
            merged = iso_cts([t - base for t in tensors], self.common_space_fraction)
        else:
            merged = _sum(tensors, base).div_(len(tensors))
        return merged.mul_(self.scale).add_(base)

    def working_set(self, num_experts: int) -> float:
        """The inputs, the task vectors, the sum and the SVDs' factors (square matrices counted whole)."""
        return 2 * num_experts + 10


__all__ = ["IsoC", "IsoCTS", "cts_split", "iso_c", "iso_cts", "matrix_rule"]
