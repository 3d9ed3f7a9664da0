"""WUDI merging (Cheng et al., ICML 2025, "Whoever started the interference should end it"), as FusionBench 0.2.33's
``wudi`` and the authors' scripts (nathanielyvo/WUDI-Merging) compute it.

A linear layer's task vector spans, approximately, the inputs its task feeds the layer, so the task vectors stand in
for the data: per 2-D tensor, the merged τ minimises the interference it causes on every task's "inputs",

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,

by Adam from τ = Σ τᵢ (lr 1e-5, 300 steps in the authors' scripts and FusionBench's function, 400 in FusionBench's
configuration file). Every other tensor (biases, norms, and 2-D tensors matched by ``not_svd``) takes the mean of the
task vectors. θ = θ₀ + scale · τ* (the reference has no scale: 1).

L is a convex quadratic, ∇L = 2(τ A − B) with A = Σᵢ τᵢᵀτᵢ / ‖τᵢ‖² (in × in) and B = Σᵢ τᵢ τᵢᵀτᵢ / ‖τᵢ‖²: each step
costs one (out × in)(in × in) product here, where the reference's autograd forms N (out × out) products. The same
gradient in another order: the result agrees with the reference to float32 rounding (tested). ``solver="exact"``
(an extension) returns the minimiser itself, B A⁺: the one gradient descent from Σ τᵢ tends to (Σ τᵢ lies in A's row
space), and RegMean's solve with the task vectors' normalised Gram matrices τᵢᵀτᵢ / ‖τᵢ‖² as the inputs' Grams.

An expert whose task vector is zero on a tensor adds nothing to L there and is left out of it (the reference
divides 0 by 0 and writes NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.strategies.base import NoContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_device, check_number, check_pattern, compute_device
from lightning_merge.strategies.functional import adam_descent
from lightning_merge.strategies.isotropic import matrix_rule
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

SOLVERS = ("adam", "exact")


def _interference_terms(taus: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """(A, B) of the module docstring from the non-zero task vectors (float32), or None when all are zero."""
    a = b = None
    for tau in taus:
        norm_sq = float(torch.linalg.vector_norm(tau).square())
        if norm_sq == 0.0:
            continue
        gram = (tau.T @ tau).div_(norm_sq)
        a = gram if a is None else a.add_(gram)
        b = tau @ gram if b is None else b.add_(tau @ gram)
    return None if a is None else (a, b)


def wudi_adam(taus: Sequence[Tensor], iterations: int, lr: float) -> Tensor:
    """WUDI's merged task vector of N same-shaped 2-D task vectors (float32): Adam on L from Σ τᵢ, torch.optim.Adam's
    update written out (:func:`~lightning_merge.strategies.functional.adam_descent`)."""
    merged = taus[0].clone()
    for tau in taus[1:]:
        merged += tau
    terms = _interference_terms(taus)
    if terms is None or iterations == 0:
        return merged
    a, b = terms
    return adam_descent(merged, lambda x: (x @ a).sub_(b).mul_(2.0), iterations, lr)


def wudi_exact(taus: Sequence[Tensor]) -> Tensor:
    """The minimum-norm minimiser of L, B A⁺ (float64 inside; eigenvalues of A below in·ε₃₂ of its largest are
    treated as 0, as float32 task vectors cannot resolve them)."""
    terms = _interference_terms([t.double() for t in taus])
    if terms is None:
        return torch.zeros_like(taus[0])
    a, b = terms
    rtol = a.shape[0] * torch.finfo(torch.float32).eps
    return (b @ torch.linalg.pinv(a, rtol=rtol, hermitian=True)).float()


@dataclasses.dataclass(frozen=True)
class WUDI(Strategy):
    """WUDI: the merged task vector that least disturbs every task's own directions, per 2-D tensor (see the module
    docstring).

    Args:
        iterations: Adam steps from Σ τᵢ (300: the authors' scripts and FusionBench's function; its configuration
            file uses 400); 0 is task arithmetic's sum. Ignored by ``solver="exact"``.
        lr: Adam's learning rate (1e-5, the reference's). Adam moves each entry by at most about ``lr`` per step,
            so the merge reaches the optimum only where the task vectors' entries are of the order of
            ``iterations × lr``; task vectors much larger than that stay near Σ τᵢ.
        solver: ``"adam"`` (the reference's optimisation) or ``"exact"`` (an extension: the optimum B A⁺ in
            closed form, one pseudo-inverse of an (in × in) matrix per tensor).
        scale: λ, the step along the merged task vector (an extension; the reference adds τ* as it is: 1).
        not_svd: a regular expression of 2-D tensor names merged by the mean instead (the reference's
            ``exclude_keys``, e.g. ``r"lm_head|embed_tokens"``); None: every 2-D tensor is optimised.
        device: where the optimisation runs: None uses the GPU when one is present, else the CPU (results agree
            within float32 rounding); ``"cpu"`` or ``"cuda[:i]"`` to choose. Each step is an (out × in)(in × in)
            product: large layers want a GPU, as the reference runs them.
    """

    name = "wudi"
    reference = Reference("https://arxiv.org/abs/2503.08099",
                          ("https://github.com/nathanielyvo/WUDI-Merging", FUSION_BENCH + "wudi/wudi.py"))
    scalable = True

    iterations: int = 300
    lr: float = 1e-5
    solver: str = "adam"
    scale: float = 1.0
    not_svd: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"WUDI.iterations must be an integer ≥ 0, got {self.iterations!r}")
        check_number(type(self), "lr", self.lr, low=0)
        if self.solver not in SOLVERS:
            raise ValueError(f"WUDI.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        check_number(type(self), "scale", self.scale)
        check_pattern(type(self), "not_svd", self.not_svd)
        check_device(type(self), self.device)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        taus = [t - base for t in tensors]
        if not matrix_rule(name, base, self.not_svd):
            return torch.stack(taus).mean(0).mul_(self.scale).add_(base)
        device = compute_device("WUDI", self.device)
        taus = [t.to(device) for t in taus]
        merged = wudi_exact(taus) if self.solver == "exact" else wudi_adam(taus, self.iterations, self.lr)
        return merged.to(base.device).mul_(self.scale).add_(base)

    def working_set(self, num_experts: int) -> float:
        """The inputs, the task vectors, the merged τ, B, Adam's two moments and the gradient (A is (in × in),
        counted as one more copy)."""
        return 2 * num_experts + 9

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """A 2-D (out × in) weight, in float32 copies of it with ρ = in/out (A and each τᵢᵀτᵢ are (in × in): ρ copies
        each): Adam holds about 2n + 10 + 2.5ρ; the exact solver's float64 task vectors, A, its pseudo-inverse and
        their products about 5.5n + 2 + 7ρ. Measured (VmHWM): Adam 32.4 copies for 64 × 512, n = 3; exact 75.2 for
        64 × 512, n = 4, and 21.1 for 256², n = 3, where 2n + 9 was declared. Other tensors: :meth:`working_set`."""
        default = self.working_set(num_experts)
        if len(shape) != 2 or 0 in shape:
            return default
        n, rho = num_experts, shape[1] / shape[0]
        held = 5.5 * n + 2 + 7 * rho if self.solver == "exact" else 2 * n + 10 + 2.5 * rho
        return max(default, held)

    def continual_form(self):  # noqa: D102
        raise NoContinualForm(
            "WUDI has no continual form here: the sums its optimisation reads include Σ τᵢᵀτᵢ/‖τᵢ‖², an (in × in) "
            "matrix per layer, not a tensor of the parameter's shape, which a continual state keeps; use iso_c or "
            "task_arithmetic for continual merges"
        )


__all__ = ["SOLVERS", "WUDI", "wudi_adam", "wudi_exact"]
