"""OPCM, orthogonal projection continual merging (Tang et al.), as ALGORITHMS.md states it.

Closed form: θ⁽ᵗ⁾ = θ₀ + n̄ₜ · Sₜ / ‖Sₜ‖ with S₁ = τ₁ and Sₜ = Sₜ₋₁ + Proj(τₜ), where n̄ₜ is the mean of the experts'
task-vector norms ‖τₛ‖ (global L2 over every merged tensor) and Proj removes from τₜ, for each linear weight, the
components along the leading singular directions of Sₜ₋₁ (the projection depends only on Sₜ₋₁'s direction, so
each tensor's Sₜ evolves on its own; only the final rescale is global). Order matters.

Used by :class:`OPCM` (a batch merge of experts in the given order) and by the continual state
(:mod:`lightning_merge.continual.state`) through :meth:`OPCM.continual_form`, which persists Sₜ and the norms so adding
expert t+1 never re-reads 1..t.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.strategies.base import ContinualForm, ContinualSummary, FoldContext, Prepared, Strategy
from lightning_merge.strategies.checks import check_device, check_number, check_pattern, compute_device
from lightning_merge.strategies.functional import thin_svd
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

#: the 2-D ``.weight`` tensors that are embeddings (``nn.Embedding``), by their usual names: OPCM does not project
#: them, as FusionBench projects ``nn.Linear`` weights only. Output heads (``lm_head``, ``classifier``...) are
#: ``nn.Linear`` and are projected.
DEFAULT_NOT_LINEAR = (
    r"(^|\.)(embed_tokens|embeddings?|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe"
    r"|shared)(\.|$)"
)


def is_projected(name: str, tensor: Tensor, not_linear: str = DEFAULT_NOT_LINEAR) -> bool:
    """Whether OPCM projects this tensor: 2-D ``.weight`` tensors (linear layers, output heads such as ``lm_head``
    included) except names matching ``not_linear`` (embeddings by default), as FusionBench projects every
    ``nn.Linear`` weight and nothing else."""
    return tensor.dim() == 2 and name.endswith("weight") and re.search(not_linear, name) is None


def opcm_project(previous: Tensor, tau: Tensor, alpha: float, tol: float = 1e-6,
                 device: torch.device | None = None) -> Tensor:
    """τ minus its components along the singular directions of ``previous`` that OPCM protects.

    With the thin SVD previous = U diag(σ) Vᵀ (k = min(m, n)), r = the number of singular values before the
    cumulative share Σ_{i≤j} σᵢ / Σ σ first exceeds ``alpha``; M = Uᵀ τ V; the entries of M on the diagonal and in
    the top-left r×r block are removed: τ̃ = τ − U (mask ⊙ M) Vᵀ. Diagonal entries are removed only where
    σᵢ > tol·σ₁ (elsewhere the singular vectors are arbitrary; FusionBench removes them all). Where no cumulative
    share exceeds ``alpha`` (α ≥ 1), r = 0. FusionBench computes the share in float32 and takes the ``argmax`` of
    the comparison, so at α = 1 its r is 0 or k − 1 depending on whether the last share rounds above 1 (about one
    random matrix in five): rounding noise, which we do not reproduce. Below 1 we use its exact expression.

    ``device``: where to compute (the SVD dominates an OPCM add; a GPU does it much faster); the result comes back
    on ``tau``'s device.

    Memory: the SVD holds ``previous``'s float32 copy, U, Vᵀ and LAPACK's workspace (gesdd: about 6.3 float32
    copies of a square matrix in all, U and Vᵀ included); afterwards at most four more full matrices (U, Vᵀ, τV and
    one product) are held at once, each temporary written over in place once it is used (the same floats as
    computing each step out of place).
    """
    home = tau.device
    if device is not None and device != home:
        previous, tau = previous.to(device), tau.to(device)
    u, s, vh = thin_svd(previous.to(torch.float32))
    if float(s.sum()) <= 0:
        return tau.clone().to(home)
    if alpha >= 1:
        r = 0  # no cumulative share exceeds α (FusionBench's float32 rounding makes this 0 or k − 1 at random)
    else:  # FusionBench's own expression, float32 rounding included, so that boundary cases agree
        r = int(((s.cumsum(dim=0) / s.sum()) > alpha).float().argmax())
    # U (M ⊙ mask) Vᵀ without forming M = Uᵀ τ V: the masked diagonal is Σᵢ uᵢ mᵢᵢ vᵢᵀ (mᵢᵢ from τV), the block
    # U_r (M_rr minus the diagonal already removed) V_rᵀ; two full matrix products instead of four. The block's
    # product is taken first, so that U and τV can then be overwritten: U ⊙ τV in U's column-major layout (which
    # fixes the order of the column sums), U ⊙ diag in U's own storage.
    tv = tau.to(torch.float32) @ vh.T  # (m, k)
    block = u[:, :r].T @ tv[:, :r] if r > 0 else None
    product = u * tv
    del tv
    diagonal = product.sum(0).mul_(s > tol * s[0])
    del product
    if block is not None:
        block.diagonal().sub_(diagonal[:r])
        block = u[:, :r] @ block @ vh[:r]
    removed = u.mul_(diagonal) @ vh
    del u, vh
    if block is not None:
        removed += block
        del block
    return removed.neg_().add_(tau).to(home)  # τ − removed (a + (−b) is a − b exactly)


def opcm_step(
    name: str, previous: Tensor | None, tau: Tensor, alpha: float, not_linear: str = DEFAULT_NOT_LINEAR,
    device: torch.device | None = None,
) -> Tensor:
    """Sₜ from Sₜ₋₁ (None for the first expert) and τₜ for one tensor (a new tensor; neither input is changed)."""
    if previous is None:
        return tau.clone()
    if is_projected(name, tau, not_linear):
        return opcm_project(previous, tau, alpha, device=device).add_(previous)  # Sₜ₋₁ + Proj(τₜ), in place
    return previous + tau


@dataclasses.dataclass(frozen=True)
class OPCM(Strategy):
    """Orthogonal projection continual merging of the experts, in the order given.

    ``θ = θ₀ + n̄ · S / ‖S‖``: see the module docstring. As a batch merge it runs two passes over the tensors (the
    first finds the global norms; the second recomputes each tensor's S and writes it). For experts that arrive one
    at a time, use :class:`lightning_merge.ContinualState`, which keeps S between additions.

    Args:
        alpha: the singular-value share OPCM protects (0.5); with α ≥ 1 no block is protected (r = 0, as
            FusionBench), only the diagonal.
        not_linear: regular expression of 2-D weight names not projected; the default matches embeddings
            (:data:`DEFAULT_NOT_LINEAR`), so every other 2-D ``.weight``, ``lm_head`` included, is projected as
            FusionBench projects every ``nn.Linear``. A head tied to its embedding: add ``|lm_head`` so that both
            copies stay equal.
        device: where the SVDs run: None uses the GPU when one is present, else the CPU (results agree within
            float32 rounding); ``"cpu"`` or ``"cuda"`` to choose.
    """

    name = "opcm"
    reference = Reference("https://arxiv.org/abs/2501.09522",
                          ("https://github.com/tanganke/opcm", FUSION_BENCH + "opcm/opcm.py"))
    global_pass = True

    alpha: float = 0.5
    not_linear: str = DEFAULT_NOT_LINEAR
    device: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "alpha", self.alpha, low=0, high=1)
        check_pattern(type(self), "not_linear", self.not_linear, optional=False)
        check_device(type(self), self.device)

    def _final(self, name: str, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        s = None
        device = compute_device("OPCM", self.device)
        for t in tensors:
            s = opcm_step(name, s, t - base, self.alpha, self.not_linear, device)
        return s

    def prepare(self, plan: MergePlan) -> Prepared:
        def partial(name: str) -> tuple[list[float], float]:
            base = plan.base_tensor(name)
            tensors = plan.expert_tensors(name, base)
            return ([float((t - base).double().square_().sum()) for t in tensors],  # fresh: squared in place
                    float(self._final(name, base, tensors).double().square_().sum()))

        norms = [0.0] * plan.num_experts
        s_norm = 0.0
        for per_expert, final in plan.map(partial, "OPCM norms").values():  # summed in plan order
            for i, value in enumerate(per_expert):
                norms[i] += value
            s_norm += final
        return Prepared(self, plan.num_experts, factor=_factor([math.sqrt(n) for n in norms], s_norm))

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        prepared = prepared if prepared is not None else self._unprepared(len(tensors))
        return self._final(name, base, tensors).mul_(prepared["factor"]).add_(base)

    def continual_form(self) -> ContinualForm:
        return _OPCMFold(self)

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """The merged norm, ``projected_share`` (the share of each expert's ‖τᵢ‖² the projection removes: 0 for the
        first) and ``tau_sq`` (‖τᵢ‖², to aggregate the shares over blocks). The projections are recomputed on the
        CPU from the task vectors, in the given order."""
        out = super().diagnose(plan, name, taus, merged)
        n = taus.shape[0]
        shares = [0.0] * n
        running = None
        for i in range(n):
            tau = taus[i]
            if running is None or not is_projected(name, tau, self.not_linear):
                kept_tau = tau
            else:
                kept_tau = opcm_project(running, tau, self.alpha)
            total = float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
            kept_sq = float(torch.linalg.vector_norm(kept_tau, dtype=torch.float64)) ** 2
            shares[i] = 1.0 - kept_sq / total if total > 0 else 0.0
            running = kept_tau.clone() if running is None else running + kept_tau
        out["projected_share"] = shares
        out["tau_sq"] = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in taus]
        return out


def _factor(norms: Sequence[float], s_norm_sq: float) -> float:
    """n̄ / ‖S‖ (0 when S vanishes)."""
    return (sum(norms) / len(norms)) / math.sqrt(s_norm_sq) if s_norm_sq > 0 else 0.0


class _OPCMFold(ContinualForm):
    """Sₜ = Sₜ₋₁ + Proj(τₜ) per tensor; ‖Sₜ‖² summed over tensors; θ = θ₀ + n̄ₜ Sₜ/‖Sₜ‖."""

    quantities = (("S", torch.float32),)

    def working_set(self, kinds: int) -> float:
        """τ and Sₜ₋₁, held through the SVD, and the SVD's own copies (for a square matrix about 6.3: the input's
        copy, U, Vᵀ and LAPACK gesdd's workspace; the projection's later temporaries are fewer, see
        :func:`opcm_project`), and ``kinds`` statistics: 9 + ``kinds`` (measured: 8.3 for 2048² float32).
        Reading τ (the base, the expert and their difference) holds less."""
        return 9 + kinds

    def __init__(self, strategy: OPCM):
        self.strategy = strategy

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return FoldContext(index, 1.0)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        s = self.strategy
        return {"S": opcm_step(name, None if running is None else running["S"], tau, s.alpha, s.not_linear,
                               compute_device("OPCM", s.device))}

    def reduce(self, name: str, running: Mapping[str, Tensor]) -> dict[str, float]:
        return {"s_norm_sq": float(running["S"].to(torch.float64, copy=True).square_().sum())}  # one float64 copy

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        factor = _factor(summary.norms, summary.totals.get("s_norm_sq", 0.0))
        return base + factor * running["S"]


__all__ = ["DEFAULT_NOT_LINEAR", "OPCM", "is_projected", "opcm_project", "opcm_step"]
