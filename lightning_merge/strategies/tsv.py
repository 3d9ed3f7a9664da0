"""TSV-M, task singular vectors merging (Gargiulo et al., CVPR 2025), as FusionBench's reference implements it.

Per 2-D tensor (a linear layer's weight), with N experts and r = min(rows, cols): each task vector's SVD
τᵢ = Uᵢ Σᵢ Vᵢᵀ is cut to its leading k = ⌊r · (1/N)⌋ singular triplets; the cut factors are placed side by side,
U = [U₁,ₖ … U_N,ₖ], Σ = diag(Σ₁,ₖ … Σ_N,ₖ), V = [V₁,ₖ … V_N,ₖ] (zero where N·k < r), and the interference between
tasks is removed by replacing U and V with their nearest orthogonal matrices (the polar factors P Qᵀ of U = P S Qᵀ):
τ* = U⊥ Σ V⊥ᵀ. Every other tensor (biases, norms, and 2-D tensors matched by ``not_svd``) takes the mean of the
task vectors. θ = θ₀ + scale · τ*.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.strategies.base import Prepared, Strategy
from lightning_merge.strategies.checks import PerExpert, check_number
from lightning_merge.strategies.registry import FUSION_BENCH, Reference


def task_singular_vectors(taus: Sequence[Tensor]) -> Tensor:
    """TSV-M of N same-shaped 2-D task vectors (float32): the cut SVDs concatenated, U and V whitened.

    ``k = int(r * (1 / N))`` triplets per task (the reference's expression, float rounding included)."""
    n = len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    k = int(r * (1 / n))
    sum_u = taus[0].new_zeros(rows, r)
    sum_s = taus[0].new_zeros(r)
    sum_vh = taus[0].new_zeros(r, cols)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k] = vh[:k]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


@dataclasses.dataclass(frozen=True)
class TSVMerge(Strategy):
    """TSV-M: task singular vectors, cut per task and decorrelated, for every 2-D tensor (see the module docstring).

    Args:
        weights: one weight per expert, multiplying its task vector before the SVD (FusionBench's list of
            ``alpha``), or None for 1.
        scale: λ, the step along the merged task vector (FusionBench's single ``alpha``; the paper uses 1).
        not_svd: a regular expression of 2-D tensor names merged by the mean instead (the reference's
            ``exclude_keys``, e.g. ``r"lm_head|embed_tokens"``); None: every 2-D tensor goes through the SVD.
    """

    name = "tsv_merge"
    reference = Reference("https://arxiv.org/abs/2412.00081", ("https://github.com/AntoAndGar/task_singular_vectors",
                                                               FUSION_BENCH + "task_singular_vector"))
    scalable = True

    weights: PerExpert = None
    scale: float = 1.0
    not_svd: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True)
        check_number(type(self), "scale", self.scale)
        if self.not_svd is not None:
            try:
                re.compile(self.not_svd)
            except (re.error, TypeError):
                raise ValueError(f"TSVMerge.not_svd must be a regular expression, got {self.not_svd!r}") from None

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def uses_svd(self, name: str, tensor: Tensor) -> bool:
        """Whether tensor ``name`` goes through the task-singular-vector merge (2-D and not matched by not_svd)."""
        return tensor.dim() == 2 and (self.not_svd is None or re.search(self.not_svd, name) is None)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        weights = self.expert_weights(len(tensors))
        taus = [(t - base).mul_(w) for t, w in zip(tensors, weights)]
        if self.uses_svd(name, base):
            merged = task_singular_vectors(taus)
        else:
            merged = torch.stack(taus).mean(0)
        return merged.mul_(self.scale).add_(base)


__all__ = ["TSVMerge", "task_singular_vectors"]
