"""RegMean, regression mean (Jin et al., ICLR 2023), from input Gram matrices captured during or after training.

For a linear layer y = W x merged from N experts, RegMean solves min_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² (each expert's
outputs on its own inputs Xᵢ), whose solution is W* = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹ with Gᵢ = XᵢᵀXᵢ. As FusionBench's reference
(``fusion_bench.method.regmean``) does:

- Gᵢ is the *mean* xxᵀ over the input rows it saw (so experts count equally, whatever their number of rows);
- the off-diagonal entries are scaled by α (``reduce_non_diagonal_ratio``): G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ), which
  interpolates between RegMean (α = 1) and a per-input-feature weighted average (α = 0);
- every tensor without Gram matrices (biases, norms, embeddings, heads not captured) takes the mean.

Here, with weights λᵢ (default 1): W* = R + (Σᵢ λᵢ (Wᵢ − R) G̃ᵢ)(Σᵢ λᵢ G̃ᵢ)⁻¹ and the others R + Σλᵢ(θᵢ − R)/Σλᵢ, with R
the base when one is given, else expert 0: the same model as the reference's formula in exact arithmetic, with the
solve done in float64 on differences (better conditioned). An extension, off by default: ``scale`` s steps along the
merged task vector, θ = θ₀ + s·τ*, as task arithmetic's λ does (it needs the base). Input features no expert ever
saw (a zero column and row of Σ G̃) are left out of the solve and take the weighted mean; the reference inverts the
singular matrix instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.strategies.base import NoContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import PerExpert, check_number
from lightning_merge.strategies.registry import FUSION_BENCH, Reference


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): the off-diagonal entries scaled by α, the diagonal kept."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(deltas: Sequence[Tensor], grams: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """(Σᵢ λᵢ Δᵢ Gᵢ)(Σᵢ λᵢ Gᵢ)⁻¹ for 2-D Δᵢ (out, in) and Gram matrices Gᵢ (in, in), in float64; input features
    with a zero total diagonal take the weighted mean of the Δᵢ columns. Returns float32."""
    total = sum(w * g.double() for w, g in zip(weights, grams))
    rhs = sum(w * (g.double() @ d.double().T) for w, g, d in zip(weights, grams, deltas))  # (in, out)
    live = total.diagonal() > 0
    mean = sum(w * d.double() for w, d in zip(weights, deltas)) / sum(weights)
    out = mean.clone()
    if bool(live.any()):
        index = live.nonzero().squeeze(1)
        a = total.index_select(0, index).index_select(1, index)
        b = rhs.index_select(0, index)
        try:
            x = torch.linalg.solve(a, b)
        except RuntimeError:  # singular beyond dead features (collinear inputs): the least-squares solution
            x = torch.linalg.lstsq(a, b, driver="gelsd").solution
        out[:, index] = x.T
    return out.float()


@dataclasses.dataclass(frozen=True)
class RegMean(Strategy):
    """RegMean: each linear layer merged to match every expert's outputs on its own inputs (see the module
    docstring), from the ``gram`` statistics ``CurvatureCapture(gram=...)`` records.

    Args:
        alpha: the scale of the Gram matrices' off-diagonal entries (FusionBench's ``reduce_non_diagonal_ratio``;
            its CLIP configuration uses 0.95, the default here). 1 is RegMean as derived; 0 a weighted average per
            input feature.
        weights: one weight per expert, multiplying its Gram matrices (and its share of the mean elsewhere), or
            None for 1.
        scale: s in θ = θ₀ + s·τ*, τ* the RegMean merge minus the base (every tensor); 1 is RegMean as published.
            Not 1 needs a base; ``sweep_scale`` chooses it on validation data (an extension: RegMean's merge is a
            weighted *mean* of the task vectors, while tuned task arithmetic usually steps further).
    """

    name = "regmean"
    reference = Reference("https://arxiv.org/abs/2212.09849",
                          ("https://github.com/bloomberg/dataless-model-merging", FUSION_BENCH + "regmean"))
    requires = ("gram",)
    scalable = True

    alpha: float = 0.95
    weights: PerExpert = None
    scale: float = 1.0

    @property
    def needs_base(self) -> bool:
        """A base is needed only to scale the merged task vector."""
        return self.scale != 1.0

    def __post_init__(self) -> None:
        check_number(type(self), "alpha", self.alpha, low=0.0, high=1.0)
        check_number(type(self), "scale", self.scale)
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True, low=0.0)
            values = self.weights if isinstance(self.weights, (list, tuple)) else [self.weights]
            if not any(v > 0 for v in values):
                raise ValueError("RegMean.weights must have a positive value")

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        weights = self.expert_weights(len(tensors))
        reference = base if base is not None else tensors[0]
        deltas = [t - reference for t in tensors]
        grams = [s.get("gram") for s in stats]
        if tensors[0].dim() != 2 or all(g is None for g in grams):
            mean = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
            return mean.mul_(self.scale).add_(reference)
        present = [g for g in grams if g is not None]
        if len(present) < len(grams):  # on_missing_statistic="uniform": isotropic inputs of the others' mean energy
            level = float(torch.stack([g.diagonal().mean() for g in present]).mean())
            identity = torch.eye(tensors[0].shape[1]) * level
            grams = [identity if g is None else g for g in grams]
        grams = [reduce_off_diagonal(g, self.alpha) for g in grams]
        return regmean_solve(deltas, grams, weights).mul_(self.scale).add_(reference)

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """A 2-D (out × in) weight with Gram matrices, for n experts, in float32 copies of it with ρ = in/out (an
        (in × in) matrix is ρ copies): the inputs and task vectors (2n + 1) with the n Grams and their off-diagonal
        reductions (2nρ; nρ with alpha = 1), and in float64 the Grams' sum, its selected rows and columns and their
        LU factors (6ρ), the right-hand side, the mean, the result, the solution, the cast and the products'
        temporaries (11), a missing Gram's identity (ρ). Measured (VmHWM, n = 3): 28.8 copies for 512², 64.8 for
        256 × 1024, 20.4 for 1024 × 256, where 4n + 5 (17) was declared. Other tensors (or none with Grams): the
        default."""
        default = super().working_set(num_experts)
        if len(shape) != 2 or 0 in shape:
            return default
        n, rho = num_experts, shape[1] / shape[0]
        grams = 2 * n if self.alpha != 1.0 else n
        return max(default, 2 * n + 12 + (grams + 7) * rho)

    def continual_form(self):  # noqa: D102
        raise NoContinualForm(
            "RegMean has no continual form here: its running sums are Gram matrices (in × in per layer), not "
            "tensors of the parameters' shapes, which a continual state keeps; use Fisher or OTA for continual merges"
        )


__all__ = ["RegMean", "reduce_off_diagonal", "regmean_solve"]
