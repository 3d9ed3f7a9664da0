"""DOP, dual orthogonal projections for data-free continual merging (Yang, Tang et al., NeurIPS 2025).

The merged model after t experts folds in expert t+1; each linear weight is found by a short optimisation that
balances two objectives, one per model being merged (the running merge, for stability, and the new expert, for
plasticity). In task-vector coordinates (x = W − W₀, τ₀ = the running merge's task vector, τ₁ = the new expert's):

    Lᵢ(x) = ‖diag(sᵢ) Uᵢᵀ (x − τᵢ)‖²_F + ‖(x − τᵢ) Vᵢ diag(sᵢ)‖²_F         (``svd_proj_space="uv"``)

where Uᵢ diag(sᵢ) Vᵢᵀ are the leading singular triplets of τᵢ: the first r, with r the number of cumulative shares
Σ_{j≤k} sⱼ / Σ s that stay below ``svd_epsilon`` (FusionBench's ``searchsorted``). x starts at the mean (τ₀ + τ₁)/2
and takes ``num_steps`` Adam steps (``lr``) on w₀L₀ + w₁L₁. With ``mgda`` the weights are the min-norm
combination of the two gradients, each divided by its own loss (MGDA, Sener & Koltun's two-task closed form),
smoothed by an exponential moving average from (``alpha``, 1 − ``alpha``) with decay ``ema_beta`` when ``ema``;
without ``mgda`` they are (``alpha``, 1 − ``alpha``). Every other tensor (biases, norms, embeddings) takes the mean
of the two: the running merge halves each earlier expert's share, as FusionBench does.

Used by :class:`DOP` (a batch merge folds the experts in the given order) and by the continual state through
:meth:`DOP.continual_form`, which keeps the merged task vector so adding expert t+1 never re-reads 1..t. Both run
:func:`dop_step`, so the two paths compute the same floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.strategies.base import ContinualForm, ContinualSummary, FoldContext, Prepared, Strategy
from lightning_merge.strategies.checks import check_device, check_number, check_pattern, compute_device
from lightning_merge.strategies.functional import thin_svd
from lightning_merge.strategies.opcm import DEFAULT_NOT_LINEAR, is_projected
from lightning_merge.strategies.registry import FUSION_BENCH, Reference

PROJ_SPACES = ("uv", "u", "v")


def dop_subspace(tau: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """The leading singular triplets of ``tau`` that DOP's losses weigh: ``(u, s, v)`` with u (m, r), s (r,), v (n, r).

    r is the number of cumulative singular-value shares Σ_{j≤k} sⱼ / Σ s that are below ``epsilon`` (FusionBench's
    ``searchsorted(share, epsilon)``, in float32 as it computes it): the triplet at which the share reaches
    ``epsilon`` is not kept. A zero ``tau`` has no subspace (r = 0; FusionBench divides by zero there).
    """
    u, s, vh = thin_svd(tau)
    total = s.sum()
    if float(total) <= 0:
        return u[:, :0], s[:0], vh[:0].T
    r = int(torch.searchsorted(s.cumsum(dim=0) / total, min(epsilon, 1.0)))
    return u[:, :r], s[:r], vh[:r].T


def dop_loss(delta: Tensor, scaled_ut: Tensor, v: Tensor, s: Tensor, space: str) -> Tensor:
    """One model's DOP loss at ``delta`` = x − τᵢ: ‖diag(s) Uᵀ δ‖² + ‖δ V diag(s)‖² (``space`` "uv"), or one term.

    ``scaled_ut`` is diag(s) Uᵀ, computed once (the product with a diagonal matrix is exact, so this equals
    FusionBench's ``torch.diag(s) @ u.T @ delta`` bit for bit).
    """
    loss = delta.new_zeros(())
    if space in ("uv", "u"):
        loss = loss + torch.linalg.matrix_norm(scaled_ut @ delta, ord="fro") ** 2
    if space in ("uv", "v"):
        loss = loss + torch.linalg.matrix_norm((delta @ v) * s, ord="fro") ** 2
    return loss


def min_norm_pair(g0: Tensor, g1: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """The weights (γ, 1 − γ) of the minimum-norm point γ g₀ + (1 − γ) g₁ on the segment between two gradients.

    Sener & Koltun's two-point closed form, as FusionBench's ``MinNormSolver`` computes it (float32 inner
    products; γ = 0.999 or 0.001 at the ends of the segment).
    """
    v11, v12, v22 = (g0 * g0).sum(), (g0 * g1).sum(), (g1 * g1).sum()
    if v12 >= v11:
        gamma: Tensor | float = 0.999
    elif v12 >= v22:
        gamma = 0.001
    else:
        gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return gamma, 1 - gamma


def dop_optimize(previous: Tensor, tau: Tensor, strategy: DOP, device: torch.device | None = None) -> Tensor:
    """The merged task vector of one linear weight from the running merge's (``previous``) and the new expert's
    (``tau``): ``num_steps`` Adam steps from their mean on the DOP objective (module docstring). Deterministic: no
    randomness enters, and the result comes back on ``tau``'s device."""
    home = tau.device
    targets = [t.to(device=device or home, dtype=torch.float32) for t in (previous, tau)]
    space = strategy.svd_proj_space
    with torch.enable_grad():
        subspaces = []
        for target in targets:
            u, s, v = dop_subspace(target, strategy.svd_epsilon)
            subspaces.append((s[:, None] * u.T, v, s))
        x = torch.nn.Parameter(torch.stack(targets).mean(dim=0))
        optimizer = torch.optim.Adam([x], lr=strategy.lr)

        def losses() -> list[Tensor]:
            return [dop_loss(x - target, *subspace, space) for target, subspace in zip(targets, subspaces)]

        weights: list[float] = [strategy.alpha, 1 - strategy.alpha]
        for _ in range(strategy.num_steps):
            if strategy.mgda:
                grads = []
                for loss in losses():
                    value = float(loss.detach())
                    (grad,) = torch.autograd.grad(loss, x)
                    grads.append(grad / (value if value > 0 else 1.0))  # FusionBench's "loss" normalisation
                sol = min_norm_pair(*grads)
                if strategy.ema:
                    beta = strategy.ema_beta
                    weights = [beta * w + (1 - beta) * float(g) for w, g in zip(weights, sol)]
                else:
                    weights = [float(g) for g in sol]
            total = sum(w * loss for w, loss in zip(weights, losses()))  # 0 + w₀L₀ + w₁L₁, as FusionBench adds them
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    return x.detach().to(home)


def dop_step(name: str, previous: Tensor | None, tau: Tensor, strategy: DOP,
             device: torch.device | None = None) -> Tensor:
    """The merged task vector of one tensor after folding in ``tau`` (``previous`` is None for the first expert):
    :func:`dop_optimize` for linear weights (2-D ``.weight`` tensors not matching ``not_linear``), the mean of
    ``previous`` and ``tau`` for every other tensor."""
    if previous is None:
        return tau.clone()
    if is_projected(name, tau, strategy.not_linear):
        return dop_optimize(previous, tau, strategy, device)
    return (previous + tau) / 2


@dataclasses.dataclass(frozen=True)
class DOP(Strategy):
    """Dual orthogonal projection continual merging of the experts, in the order given (module docstring).

    A batch merge folds the experts one at a time exactly as a continual state adds them: θ = θ₀ + x, where x is
    the first expert's task vector folded with each next one by :func:`dop_step`. The defaults are FusionBench's
    configuration ``method/dop/dop.yaml`` (the paper's runs), except that the order is the one given
    (FusionBench's configuration shuffles it).

    Args:
        lr: Adam's learning rate per linear weight (1e-4).
        num_steps: Adam steps per linear weight and added expert (200); 0 gives the mean of the two.
        mgda: weigh the two losses by MGDA's min-norm solution (True); False uses the fixed ``alpha``.
        ema: smooth MGDA's weights by an exponential moving average started at (``alpha``, 1 − ``alpha``) (True).
        ema_beta: the average's decay (0.999).
        alpha: the running merge's weight: fixed without ``mgda``, the average's start with it (0.8).
        svd_epsilon: the singular-value share below which triplets of each task vector are kept (0.99999).
        svd_proj_space: ``"uv"`` (both projections), ``"u"`` (left singular vectors) or ``"v"`` (right).
        not_linear: regular expression of 2-D weight names that are averaged instead of optimised; the default
            matches embeddings, as FusionBench optimises every ``nn.Linear`` weight (heads included) and nothing
            else.
        device: where the SVDs and steps run: None uses the GPU when one is present, else the CPU; ``"cpu"`` or
            ``"cuda"`` to choose (results agree within float32 rounding, amplified by the steps: see
            docs/continual.md).
    """

    name = "dop"
    reference = Reference("https://openreview.net/forum?id=zD5cUX67b9",
                          ("https://github.com/EnnengYang/DOP", FUSION_BENCH + "dop/dop.py"))

    lr: float = 1e-4
    num_steps: int = 200
    mgda: bool = True
    ema: bool = True
    ema_beta: float = 0.999
    alpha: float = 0.8
    svd_epsilon: float = 0.99999
    svd_proj_space: str = "uv"
    not_linear: str = DEFAULT_NOT_LINEAR
    device: str | None = None

    def __post_init__(self) -> None:
        check_number(type(self), "lr", self.lr, low=0)
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"DOP.num_steps must be a whole number ≥ 0, got {self.num_steps!r}")
        for flag in ("mgda", "ema"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"DOP.{flag} must be True or False, got {getattr(self, flag)!r}")
        check_number(type(self), "ema_beta", self.ema_beta, low=0, high=1)
        check_number(type(self), "alpha", self.alpha, low=0, high=1)
        check_number(type(self), "svd_epsilon", self.svd_epsilon, low=0, high=1)
        if self.svd_proj_space not in PROJ_SPACES:
            raise ValueError(f"DOP.svd_proj_space must be one of {', '.join(PROJ_SPACES)}, got "
                             f"{self.svd_proj_space!r}")
        check_pattern(type(self), "not_linear", self.not_linear, optional=False)
        check_device(type(self), self.device)

    def working_set(self, num_experts: int) -> float:
        """The inputs (n experts, the base) and the result, the running and new task vectors, and the optimiser's
        copies: x, its gradient, Adam's two moments, the two normalised gradients, two SVDs' factors (U and V of
        each, a whole copy each at most), and the autograd temporaries of one loss (δ and its projections)."""
        return num_experts + 4 + 14

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        device = compute_device("DOP", self.device)
        merged = None
        for t in tensors:
            merged = dop_step(name, merged, t - base, self, device)
        return merged.add_(base)

    def continual_form(self) -> ContinualForm:
        return _DOPFold(self)


class _DOPFold(ContinualForm):
    """x per tensor (the merged task vector); folding expert t+1 runs :func:`dop_step`; θ = θ₀ + x."""

    quantities = (("x", torch.float32),)

    def __init__(self, strategy: DOP):
        self.strategy = strategy

    def working_set(self, kinds: int) -> float:
        """The fold's copies plus the optimiser's (:meth:`DOP.working_set`)."""
        return super().working_set(kinds) + 12

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        return FoldContext(index, 1.0)

    def fold(self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
             ctx: FoldContext) -> dict[str, Tensor]:
        s = self.strategy
        return {"x": dop_step(name, None if running is None else running["x"], tau, s, compute_device("DOP", s.device))}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        return base + running["x"]


__all__ = ["DOP", "dop_loss", "dop_optimize", "dop_step", "dop_subspace", "min_norm_pair"]
