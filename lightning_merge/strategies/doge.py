"""DOGE-TA, the data-free variant of DOGE (Wei et al., ICML 2025, "Modeling Multi-Task Model Merging as Adaptive
Projective Gradient Descent"), as FusionBench 0.2.33's ``doge_ta`` computes it.

Task arithmetic with a learned correction δ shared by the experts, per 2-D tensor (τᵢ the task vectors, N experts,
r = min(out, in)):

1. coefficients λᵢ = ``lamda`` / ‖τᵢ‖_F (per tensor); T = Σ λᵢ τᵢ, Λ = Σ λᵢ;
2. the shared subspace: each expert's top ⌊r/N⌋ left singular vectors side by side (an out × r matrix, zero columns
   where N does not divide r), and its top k = ⌊r/``subspace``⌋ left singular vectors U (out × k);
3. δ minimises, from δ = 0 by Adam (``iterations`` steps at ``lr``), the data-free stand-in for each task's loss
   change, row by row (τⱼ[r] the r-th row):

       L(δ) = Σⱼ Σ_r ⟨τⱼ[r], τⱼ[r] − T[r] − Λ δ[r]⟩²,

   its gradient projected off the shared subspace before each step: g ← g − U Uᵀ g (the reference's P = U Uᵀ);
4. each expert keeps its top ``density`` of |τᵢ| over the whole model (the optimised tensors only: every entry with
   |τᵢ| at least its ⌊d·density⌋ + 1-th largest, ties included, d their number of entries): a mask mᵢ;
5. τ* = Σᵢ λᵢ (τᵢ + δ) ⊙ mᵢ; θ = θ₀ + scale · τ* (the reference has no scale: 1).

Every other tensor (1-D, ≥ 3-D, and 2-D tensors matched by ``not_svd``) keeps the base's value, as in the
reference (``others="base"``), or takes the mean of the task vectors (``others="mean"``, an extension).

∇L = −2Λ Σⱼ aⱼ ⊙ τⱼ with aⱼ[r] = ⟨τⱼ[r], τⱼ[r] − T[r] − Λ δ[r]⟩ (one number per row): each step costs two passes
over the stacked task vectors, where the reference's autograd builds the N products of its loss. The same gradient
in another order: the merge agrees with the reference to float32 rounding (tested).

An expert whose task vector is zero on a tensor gets λᵢ = 0 there and adds no direction to the shared subspace (the
reference divides by its zero norm and writes NaN).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_merge.strategies.base import NoContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_choice, check_device, check_number, check_pattern, compute_device
from lightning_merge.strategies.functional import adam_descent, ranked_svd, rounding_noise
from lightning_merge.strategies.pcb import model_order_statistics
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

OTHERS = ("base", "mean")


def doge_coefficients(taus: Sequence[Tensor], lamda: float) -> list[float]:
    """λᵢ = ``lamda`` / ‖τᵢ‖_F of one tensor's task vectors (0 for a zero task vector)."""
    norms = [float(torch.linalg.vector_norm(t)) for t in taus]
    return [lamda / norm if norm > 0 else 0.0 for norm in norms]


def shared_subspace(taus: Sequence[Tensor], subspace: float, floors: Sequence[float] | None = None) -> Tensor | None:
    """U (out × k), the shared subspace the gradient is projected off: the top k = ⌊r/``subspace``⌋ left singular
    vectors of the experts' top ⌊r/N⌋ left singular vectors set side by side (r = min(out, in)); None when k = 0.
    Each SVD keeps its numerical rank only (``floors``: each task vector's rounding noise)."""
    n = len(taus)
    out, cols = taus[0].shape
    r = min(out, cols)
    k = int(r / subspace)
    if k == 0:
        return None
    per = int(r / n)
    gathered = taus[0].new_zeros(out, r)
    for i, tau in enumerate(taus):
        if per == 0 or not bool(tau.any()):
            continue
        u = ranked_svd(tau, floor=floors[i] if floors is not None else 0.0)[0]
        gathered[:, i * per:(i + 1) * per] = u[:, :per]
    return ranked_svd(gathered)[0][:, :k]


def doge_gradient(taus: Sequence[Tensor], lambdas: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """∇L of the module docstring as a function of δ (a new tensor each call): −2Λ Σⱼ aⱼ ⊙ τⱼ, aⱼ[r] the row inner
    products ⟨τⱼ[r], τⱼ[r] − T[r] − Λ δ[r]⟩."""
    stacked = torch.stack(list(taus))
    weights = torch.tensor(list(lambdas), dtype=stacked.dtype, device=stacked.device)
    total_weight = float(sum(lambdas))
    combined = torch.einsum("n,noi->oi", weights, stacked)
    fixed = (stacked * (stacked - combined)).sum(-1)  # ⟨τⱼ[r], τⱼ[r] − T[r]⟩, (N, out)

    def gradient(delta: Tensor) -> Tensor:
        rows = fixed - total_weight * torch.einsum("noi,oi->no", stacked, delta)
        return torch.einsum("no,noi->oi", rows, stacked).mul_(-2.0 * total_weight)

    return gradient


def doge_delta(taus: Sequence[Tensor], lambdas: Sequence[float], basis: Tensor | None, iterations: int,
               lr: float) -> Tensor:
    """δ of the module docstring (float32, the task vectors' device): Adam from 0 on L, each gradient projected off
    ``basis`` (U, or None for no projection)."""
    objective = doge_gradient(taus, lambdas)

    def projected(delta: Tensor) -> Tensor:
        grad = objective(delta)
        if basis is not None:
            grad -= basis @ (basis.T @ grad)
        return grad

    return adam_descent(torch.zeros_like(taus[0]), projected, iterations, lr)


@dataclasses.dataclass(frozen=True)
class DogeTA(Strategy):
    """DOGE-TA: task arithmetic with per-expert coefficients λᵢ = ``lamda``/‖τᵢ‖ and a shared correction δ learned
    without data, its updates kept off the experts' shared subspace, then each expert's top ``density`` entries (see
    the module docstring for the exact steps).

    Args:
        lamda: the coefficients' numerator, λᵢ = lamda / ‖τᵢ‖_F per tensor (the reference's ``lamda``, 0.07, spelt
            as it spells it): each expert contributes a step of length ``lamda`` along its own task vector.
        density: the fraction of each expert's entries kept, over all optimised tensors of the model (the
            reference's ``K``: 30, i.e. 30 %). 1 keeps every entry.
        subspace: the divisor that sets the shared subspace's size, ⌊min(out, in) / subspace⌋ directions per tensor
            (the reference's ``subspace``, 6); 0 directions (a large divisor) leaves the gradient unprojected.
        iterations: Adam steps on δ per tensor (the reference's 400); 0 leaves δ = 0 (masked, λ-weighted task
            arithmetic).
        lr: Adam's learning rate (the reference's 1e-4). Adam moves each entry of δ by at most about ``lr`` per step.
        scale: the step along the merged task vector, θ₀ + scale·τ* (an extension; the reference adds τ* as it is: 1).
        not_svd: a regular expression of 2-D tensor names treated like the non-2-D tensors (``others``); None: every
            2-D tensor is optimised. The reference optimises the 2-D weights whose name contains ``encoder`` and not
            ``layer_norm`` (CLIP's and T5's encoder blocks) and leaves every other tensor at the base.
        others: what the tensors outside the rule take: ``"base"`` (the reference: θ₀ unchanged) or ``"mean"``
            (an extension: θ₀ + scale · the mean task vector, as TSV-M, ISO-C and WUDI do).
        device: where the SVDs and the optimisation run: None uses the GPU when one is present, else the CPU
            (results agree within float32 rounding); ``"cpu"`` or ``"cuda[:i]"`` to choose.
    """

    name = "doge_ta"
    reference = Reference("https://arxiv.org/abs/2501.01230", (FUSION_BENCH + "doge_ta/doge_ta.py",))
    scalable = True
    global_pass = True

    lamda: float = 0.07
    density: float = 0.3
    subspace: float = 6.0
    iterations: int = 400
    lr: float = 1e-4
    scale: float = 1.0
    not_svd: str | None = None
    others: str = "base"
    device: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "lamda", self.lamda, low=0)
        check_number(type(self), "density", self.density, low=0, high=1)
        if not self.density > 0:
            raise ValueError(f"DogeTA.density must be in (0, 1], got {self.density!r}")
        check_number(type(self), "subspace", self.subspace, low=0)
        if not self.subspace > 0:
            raise ValueError(f"DogeTA.subspace must be > 0, got {self.subspace!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"DogeTA.iterations must be an integer ≥ 0, got {self.iterations!r}")
        check_number(type(self), "lr", self.lr, low=0)
        check_number(type(self), "scale", self.scale)
        check_pattern(type(self), "not_svd", self.not_svd)
        check_choice(type(self), "others", self.others, OTHERS)
        check_device(type(self), self.device)

    def optimised(self, name: str, ndim: int) -> bool:
        """Whether tensor ``name`` (of ``ndim`` dimensions) goes through DOGE's rule: 2-D and not matched by
        ``not_svd``."""
        return ndim == 2 and (self.not_svd is None or re.search(self.not_svd, name) is None)

    def prepare(self, plan: MergePlan) -> Prepared:
        """Each expert's magnitude threshold over the optimised tensors: the ⌊d·density⌋ + 1-th largest |τᵢ|
        (None: every entry kept), exact, in two streaming passes."""
        n = plan.num_experts
        chosen = {name for name in plan.names if self.optimised(name, len(plan.spec(name).shape))}
        d = sum(plan.spec(name).numel for name in chosen)
        kept = int(d * self.density)
        if kept >= d:
            return Prepared(self, n, thresholds=[None] * n)

        def magnitudes(name: str) -> Tensor:
            if name not in chosen:
                return torch.zeros(n, 0)
            return plan.task_vectors(name).reshape(n, -1).abs()

        stats = model_order_statistics(plan, magnitudes, [[d - kept - 1]] * n, "DOGE top-k thresholds")
        return Prepared(self, n, thresholds=[s[0] for s in stats])

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        n = len(tensors)
        prepared = prepared if prepared is not None else self._unprepared(n)
        taus = [t - base for t in tensors]
        if not self.optimised(name, base.dim()):
            if self.others == "base":
                return base.clone()
            return torch.stack(taus).mean(0).mul_(self.scale).add_(base)
        device = compute_device("DogeTA", self.device)
        taus = [t.to(device) for t in taus]
        lambdas = doge_coefficients(taus, self.lamda)
        basis = shared_subspace(taus, self.subspace, [rounding_noise(t) for t in tensors])
        delta = doge_delta(taus, lambdas, basis, self.iterations, self.lr)
        merged = torch.zeros_like(delta)
        for tau, weight, threshold in zip(taus, lambdas, prepared["thresholds"]):
            if weight == 0.0:
                continue
            adjusted = tau + delta
            if threshold is not None:
                adjusted *= tau.abs() >= threshold
            merged.add_(adjusted, alpha=weight)
        return merged.to(base.device).mul_(self.scale).add_(base)

    def working_set(self, num_experts: int) -> float:
        """The inputs, the task vectors, their stack and one (N, out, in) temporary of the objective's products, δ,
        Adam's two moments, the gradient and its temporaries, the merged τ (the shared subspace is (out × out) at
        most, counted as one more copy)."""
        return 4 * num_experts + 10

    def continual_form(self):  # noqa: D102
        raise NoContinualForm(
            "DogeTA has no continual form: its shared subspace is taken from every expert's singular vectors, its "
            "correction δ is optimised against every task vector at once and its masks are model-wide top-k; use "
            "iso_c or task_arithmetic for continual merges"
        )


__all__ = ["OTHERS", "DogeTA", "doge_coefficients", "doge_delta", "doge_gradient", "shared_subspace"]
