"""TSV-M, task singular vectors merging (Gargiulo et al., CVPR 2025), as FusionBench's reference implements it.

Per 2-D tensor (a linear layer's weight), with N experts and r = min(rows, cols): each task vector's SVD
τᵢ = Uᵢ Σᵢ Vᵢᵀ is cut to its leading k = ⌊r · (1/N)⌋ singular triplets; the cut factors are placed side by side,
U = [U₁,ₖ … U_N,ₖ], Σ = diag(Σ₁,ₖ … Σ_N,ₖ), V = [V₁,ₖ … V_N,ₖ] (zero where N·k < r), and the interference between
tasks is removed by replacing U and V with their nearest orthogonal matrices (the polar factors P Qᵀ of U = P S Qᵀ):
τ* = U⊥ Σ V⊥ᵀ. Every other tensor (biases, norms, and 2-D tensors matched by ``not_svd``) takes the mean of the
task vectors. θ = θ₀ + scale · τ*.

**In the metric of the captured curvature** (``metric``, an extension, off by default). Plain TSV-M cuts and
decorrelates in the Frobenius metric, in which every weight entry counts alike. The captured statistics define the
metric in which a change of the weights actually costs: RegMean's objective charges a change Δ of a linear layer
tr(Δ G Δᵀ) = ‖Δ G^{1/2}‖²_F (G = E[x xᵀ], the input Gram), a diagonal Fisher F charges Σⱼₖ Fⱼₖ Δⱼₖ². TSV-M in that
metric whitens, runs TSV-M, and maps back:

    τ̃ᵢ = A^{1/2} τᵢ B^{1/2},   τ̃* = TSV-M(τ̃₁ … τ̃_N),   τ* = A^{-1/2} τ̃* B^{-1/2}

with one metric *shared* by every expert, so that the SVDs, the concatenation and the orthogonalisation of U and V
all happen in one space (per-expert metrics would put each Ṽᵢ in a different coordinate system, where stacking and
orthogonalising them has no meaning), and the whole merge is one similarity transform of TSV-M (the cut keeps the
directions that change the outputs most on the data; the polar factors decorrelate the tasks' effects on it):

- ``metric="gram"``: A = I, B = M = mean over experts of G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ) (RegMean's off-diagonal
  shrinkage, ``alpha``): ‖τ M^{1/2}‖²_F = E‖τ x‖² on the pooled inputs of every task, which the merged model serves.
- ``metric`` an elementwise kind (``"fisher"``, ``"fisher.batch"``, ``"exp_avg_sq"``, …): each expert's statistic
  Fᵢ (τᵢ's shape) is divided by its mean (experts count alike, whatever their loss scale), F̄ = mean of those, and
  F̄ is reduced to its Adafactor rank-1 factors (the sidecar's ``rank1`` compression): F̄ⱼₖ ≈ aⱼ bₖ with a = row
  means, b = column means, each divided by its mean; A = diag(a), B = diag(b), so ‖A^{1/2} τ B^{1/2}‖²_F =
  Σ aⱼ bₖ τⱼₖ² ≈ Σ F̄ⱼₖ τⱼₖ². (The elementwise weighting itself is not a similarity transform: the SVD needs
  factors acting on rows and columns.)

Regularisation: the metric is normalised to mean diagonal 1 (TSV-M is homogeneous of degree 1, so its scale does
not matter) and damped, M ← (M + δ I)/(1 + δ) with δ = ``damping``, so that directions the data never reached are
shrunk by √δ before the SVD instead of being lost, and the inverse square root stays bounded (δ = 0: a
pseudo-inverse; the part of τᵢ on the null space of M, inputs no expert saw, then takes the mean of the experts, as
RegMean does for them; a zero metric, as an adapter's untouched layer carries, gives the mean with δ = 0 and plain
TSV-M with δ > 0). M^{±1/2} comes from an eigendecomposition in float64 (elementwise when M is diagonal).
With identity Grams or uniform curvature, A = B = I exactly and the merge is plain TSV-M, bit for bit. A 2-D
tensor without the statistic for any expert is merged by plain TSV-M; an expert lacking it (``on_missing_statistic=
"uniform"``) counts as an isotropic metric of the others' mean level.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.formats.sidecar import FISHER_ESTIMATORS
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Prepared, Strategy
from lightning_merge.strategies.checks import PerExpert, check_choice, check_number, check_pattern
from lightning_merge.strategies.registry import FUSION_BENCH, Reference
from lightning_merge.strategies.regmean import reduce_off_diagonal


def task_singular_vectors(taus: Sequence[Tensor], floors: Sequence[float] | None = None) -> Tensor:
    """TSV-M of N same-shaped 2-D task vectors (float32): the cut SVDs concatenated, U and V whitened.

    ``k = int(r * (1 / N))`` triplets per task (the reference's expression, float rounding included); a task's
    triplets past its numerical rank are zero (:func:`~lightning_merge.strategies.functional.ranked_svd`: the
    reference keeps null-space vectors there, which LAPACK chooses freely, and the orthogonalisation mixes them into
    the other tasks' directions); ``floors``: each task vector's rounding noise
    (:func:`~lightning_merge.strategies.functional.rounding_noise`), below which its triplets are noise too."""
    n = len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    k = int(r * (1 / n))
    sum_u = taus[0].new_zeros(rows, r)
    sum_s = taus[0].new_zeros(r)
    sum_vh = taus[0].new_zeros(r, cols)
    for i, tau in enumerate(taus):
        u, s, vh = F.ranked_svd(tau, floor=floors[i] if floors is not None else 0.0)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k] = vh[:k]
    u_u, _, vh_u = F.ranked_svd(sum_u)  # polar factors over the numerical rank: experts sharing directions
    u_vh, _, vh_vh = F.ranked_svd(sum_vh)  # (identical, collinear) leave U rank-deficient
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


ELEMENTWISE = ("exp_avg_sq", "fisher", *(f"fisher.{e}" for e in FISHER_ESTIMATORS))
METRICS = (None, "gram", *ELEMENTWISE)
_NULL = 1e-12  # eigenvalues (relative to the largest) below this are the metric's null space when damping is 0


def metric_roots(metric: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """(M^{1/2}, M^{-1/2}, null projector or None, ‖M^{1/2}‖₂) of a symmetric positive semidefinite metric, in
    float64, after normalising it to mean diagonal 1 (a zero metric stays zero) and damping it to (M + δ I)/(1 + δ).

    A 1-D ``metric`` is a diagonal one and gives 1-D roots (elementwise); so does a 2-D one whose off-diagonal
    entries are all 0. The inverse root is the pseudo-inverse's; the projector (1-D: a 0/1 mask) onto the null
    space is None when the metric has full rank."""
    m = metric.double()
    if m.dim() == 2:
        m = (m + m.T) / 2  # a float32 Gram is symmetric only to rounding; eigh reads one triangle
    if m.dim() == 2 and bool((m - torch.diag_embed(m.diagonal())).eq(0).all()):
        m = m.diagonal()
    diag = m if m.dim() == 1 else m.diagonal()
    level = diag.mean()
    if bool(level > 0):  # a zero metric (an adapter's untouched layer: no expert saw an input) stays zero
        m = m / level
    if damping:
        m = (m + damping) / (1 + damping) if m.dim() == 1 else (m + damping * torch.eye(len(m), dtype=m.dtype)) / (
            1 + damping)
    if m.dim() == 1:
        live = m > _NULL * m.max()
        half = m.clamp_min(0).sqrt()
        inv = torch.where(live, 1 / half.where(live, torch.ones_like(half)), torch.zeros_like(half))
        return half, inv, None if bool(live.all()) else (~live).double(), float(half.max())
    values, vectors = torch.linalg.eigh(m)
    live = values > _NULL * values.max()
    root = values.clamp_min(0).sqrt()
    inv_root = torch.where(live, 1 / root.where(live, torch.ones_like(root)), torch.zeros_like(root))
    half = (vectors * root) @ vectors.T
    inv = (vectors * inv_root) @ vectors.T
    null = None if bool(live.all()) else (vectors[:, ~live] @ vectors[:, ~live].T)
    return half, inv, null, float(root.max())


def _right(x: Tensor, root: Tensor) -> Tensor:
    """x · R for a 1-D (diagonal) or 2-D root R."""
    return x * root if root.dim() == 1 else x @ root


def whitened_task_singular_vectors(taus: Sequence[Tensor], rows: Tensor | None, cols: Tensor,
                                   damping: float = 0.0, floors: Sequence[float] | None = None) -> Tensor:
    """TSV-M in a shared metric: τ* = A^{-1/2} TSV-M(A^{1/2} τᵢ B^{1/2}) B^{-1/2} (the module docstring), float32.

    Args:
        taus: N same-shaped 2-D task vectors (out, in).
        rows: the row metric A as a 1-D tensor (out,) (its diagonal), or None for the identity.
        cols: the column metric B, (in, in) or its diagonal (in,).
        damping: δ, the metrics' damping toward the identity after normalising them to mean diagonal 1.
        floors: each task vector's rounding noise (:func:`task_singular_vectors`), carried through the whitening
            (times the roots' largest gains) plus the float32 rounding of the whitened vector.

    Returns:
        The merged task vector; on the metrics' null spaces (δ = 0 only) the mean of the ``taus``.
    """
    col_half, col_inv, col_null, col_gain = metric_roots(cols, damping)
    if rows is None:
        row_half = row_inv = row_null = None
        row_gain = 1.0
    else:
        row_half, row_inv, row_null, row_gain = metric_roots(rows, damping)
    white = []
    for tau in taus:
        t = _right(tau.double(), col_half)
        if row_half is not None:
            t = row_half[:, None] * t
        white.append(t.float())
    white_floors = None
    if floors is not None:  # the roots' largest gains, from the eigendecompositions metric_roots took
        white_floors = [f * col_gain * row_gain + F.rounding_noise(w) for f, w in zip(floors, white)]
    merged = task_singular_vectors(white, white_floors).double()
    merged = _right(merged, col_inv)
    if row_inv is not None:
        merged = row_inv[:, None] * merged
    if col_null is not None or row_null is not None:  # the part of every τᵢ the metric cannot see: the mean
        mean = torch.stack(taus).double().mean(0)
        kept = mean - _right(mean, col_null) if col_null is not None else mean
        if row_null is not None:
            kept = kept - row_null[:, None] * kept
        merged = merged + (mean - kept)
    return merged.float()


@dataclasses.dataclass(frozen=True)
class TSVMerge(Strategy):
    """TSV-M: task singular vectors, cut per task and decorrelated, for every 2-D tensor (see the module docstring).

    Args:
        weights: one weight per expert, multiplying its task vector before the SVD (FusionBench's list of
            ``alpha``), or None for 1.
        scale: λ, the step along the merged task vector (FusionBench's single ``alpha``; the paper uses 1).
        not_svd: a regular expression of 2-D tensor names merged by the mean instead (the reference's
            ``exclude_keys``, e.g. ``r"lm_head|embed_tokens"``); None: every 2-D tensor goes through the SVD.
        metric: the captured statistic whose metric TSV-M runs in (an extension; module docstring): None (the
            Frobenius metric: TSV-M as published), ``"gram"`` (the experts' mean input Gram matrix, RegMean's
            statistic), or an elementwise kind reduced to row and column factors (``"fisher"``, ``"fisher.batch"``,
            ``"fisher.example"``, ``"fisher.true"``, ``"fisher.exact"``, ``"exp_avg_sq"``).
        alpha: the Gram matrices' off-diagonal scale, as RegMean's (``metric="gram"`` only; 1 keeps them whole,
            0 keeps their diagonal).
        mask: an elementwise statistic kind (as ``metric``'s) whose saliency Fᵢ ⊙ τᵢ² masks each task vector of a
            2-D tensor before the SVD, or None (no mask).
        density: the fraction of entries each task vector keeps under ``mask`` (0 < density ≤ 1).
        damping: δ, the metric's damping toward the identity after normalising it to mean diagonal 1,
            (M + δI)/(1 + δ): 0 whitens fully (a pseudo-inverse maps back), large values approach plain TSV-M.
    """

    name = "tsv_merge"
    reference = Reference("https://arxiv.org/abs/2412.00081", ("https://github.com/AntoAndGar/task_singular_vectors",
                                                               FUSION_BENCH + "task_singular_vector"))
    scalable = True

    weights: PerExpert = None
    scale: float = 1.0
    not_svd: str | None = None
    metric: str | None = None
    alpha: float = 0.95
    damping: float = 0.01
    mask: str | None = None
    density: float = 1.0

    @property
    def requires(self) -> tuple[str, ...]:
        """The ``metric``'s and the ``mask``'s statistic kinds, when chosen."""
        return tuple(dict.fromkeys(k for k in (self.metric, self.mask) if k is not None))

    def __post_init__(self) -> None:
        check_choice(type(self), "metric", self.metric, METRICS)
        check_number(type(self), "alpha", self.alpha, low=0.0, high=1.0)
        check_number(type(self), "damping", self.damping, low=0.0)
        check_choice(type(self), "mask", self.mask, (None, *ELEMENTWISE))
        check_number(type(self), "density", self.density, low=0.0, high=1.0)
        if self.density <= 0:
            raise ValueError(f"TSVMerge.density must be in (0, 1], got {self.density!r}")
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True)
        check_number(type(self), "scale", self.scale)
        check_pattern(type(self), "not_svd", self.not_svd)

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
            merged = self._svd_merge(taus, stats, [F.rounding_noise(t) * abs(w) for t, w in zip(tensors, weights)])
        else:
            merged = torch.stack(taus).mean(0)
        return merged.mul_(self.scale).add_(base)

    def _svd_merge(self, taus: list[Tensor], stats: Sequence[Mapping[str, Tensor]], floors: list[float]) -> Tensor:
        """TSV-M of one 2-D tensor's task vectors (``floors``: their rounding noise), in the ``metric`` when one is
        chosen and present."""
        if self.mask is not None and self.density < 1:
            taus = [tau.mul_(F.topk_mask(s[self.mask] * tau.square(), F.keep_count(self.density, tau.numel())))
                    for tau, s in zip(taus, stats)]
        if self.metric is None:
            return task_singular_vectors(taus, floors)
        values = [s.get(self.metric) for s in stats]
        present = [v for v in values if v is not None]
        if not present:
            return task_singular_vectors(taus, floors)
        if self.metric == "gram":
            level = float(torch.stack([g.diagonal().double().mean() for g in present]).mean())
            grams = [torch.eye(taus[0].shape[1], dtype=torch.float64) * level if g is None
                     else reduce_off_diagonal(g.double(), self.alpha) for g in values]
            return whitened_task_singular_vectors(taus, None, torch.stack(grams).mean(0), self.damping, floors)
        curvatures = []
        for value in present:
            level = value.double().mean()
            curvatures.append(value.double() / level if bool(level > 0) else torch.ones_like(value.double()))
        curvatures += [torch.ones_like(curvatures[0])] * (len(values) - len(present))
        mean = torch.stack(curvatures).mean(0)
        return whitened_task_singular_vectors(taus, mean.mean(1), mean.mean(0), self.damping, floors)


__all__ = ["ELEMENTWISE", "METRICS", "TSVMerge", "metric_roots", "task_singular_vectors",
           "whitened_task_singular_vectors"]
