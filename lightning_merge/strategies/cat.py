"""CAT Merging, conflict-aware task merging (Sun et al., ICML 2025, arXiv 2505.06977), from captured input Grams.

Task arithmetic adds θ₀ + λ Σⱼ τⱼ; CAT first trims from each task vector the components that conflict with the
other tasks, then adds the trimmed vectors the same way. The rule depends on the kind of parameter, as in the
authors' ``cat_merging_utils.py`` (SunWenJu123/model-merging, read through its line-by-line LLM port in a public
repository, since the original is not at hand here):

- **Linear weights** (2-D, (out, in), with an input Gram matrix Sᵢ = XᵢᵀXᵢ for every task i). Task j's vector moves
  task i's layer outputs by Xᵢ τⱼᵀ; removing a subspace B (out × r, orthonormal) from τⱼ (τⱼ ← τⱼ − BBᵀτⱼ) lowers
  that interference by ‖Xᵢ τⱼᵀ B‖² and costs task j ‖Xⱼ τⱼᵀ B‖² of its own change. For each task i the reference
  takes the B that maximises Σⱼ≠ᵢ (‖Xᵢ τⱼᵀ B‖² − λ ‖Xⱼ τⱼᵀ B‖²): the leading eigenvectors of

      Gᵢ = Σⱼ≠ᵢ τⱼ (Sᵢ − λ Sⱼ) τⱼᵀ        (out × out),

  and removes Bᵢ from every other task's vector. ``ratio`` picks how many: an integer c ≥ 1 takes the c leading
  eigenvectors (the reference's default, 4); a fraction 0 < ratio < 1 takes the leading positive ones whose squared
  eigenvalues stay under that share of their total; −1 every eigenvector with a positive eigenvalue; 0 none (an
  integer takes its c leading eigenvectors even when some are not positive, as the reference does). A
  tensor whose Gᵢ has no positive eigenvalue is not trimmed for task i. The projections are applied to τⱼ in task
  order, each followed by a rescale to τⱼ's norm before it (τⱼ ← P τⱼ · ‖τⱼ‖ / ‖P τⱼ‖; a projection that would
  leave nothing is skipped, as in the reference). Every Gᵢ is computed from the untrimmed task vectors.
- **Biases and other 1-D tensors** (not norm scales): data-free masking. For each task i, the ``ratio_bias``
  entries of largest τᵢ² (the reference's rule: the entries at or above the (numel − ratio_bias)-th smallest, which
  is ratio_bias + 1 entries when there are no ties; a fraction 0 < ratio_bias < 1 the entries at or above the
  ⌊numel (1 − ratio_bias)⌋-th smallest) are zeroed in every *other* task's vector. No rescale.
- **Everything else** (norm scales, 2-D tensors without Gram matrices such as embeddings, scalars, convolutions):
  τⱼ as it is.

θ = θ₀ + scale · Σⱼ τ̃ⱼ (the reference's ``scaling_coef``, 0.4).

What differs from the reference, and why:

- The Grams are the library's: the mean xxᵀ over the rows the capture saw (``CurvatureCapture(gram=...)``), where
  the reference sums XᵀX over a few exemplars per task (2 by default) taken on the model θ₀ + scaling_coef · τᵢ.
  When every task contributes the same number of rows, sums and means differ by one common factor, which changes no
  eigenvector, no eigenvalue sign and no energy share: the merge is the reference's on the same inputs (tested
  against a transcription of the reference to float32 rounding). With unequal row counts the mean weighs each task
  equally where the sum weighs it by its rows. To reproduce the reference's inputs, capture Grams with
  :func:`~lightning_merge.capture.grams.compute_grams` on θ₀ + 0.4 τᵢ over a few of task i's examples.
- Normalisation scales: the reference masks, for each task i, the ``ratio_ln`` dimensions where the other tasks'
  scale changes disturb task i's normalised features most (Σⱼ≠ᵢ E[x̂ᵢ²] τⱼ² − λ_ln E[x̂ⱼ²] τⱼ², x̂ the norm's input
  after normalisation, before its affine map), rescaled to the norm before. The per-dimension E[x̂²] is not in the
  captured statistics (they are Grams of linear layers' inputs, i.e. of a norm's *output* γ x̂ + β, from which
  E[x̂²] needs E[y] as well when β ≠ 0, and the layer that reads each norm), so this strategy is the reference with
  ``ratio_ln = 0`` (a setting it supports): norm scales keep their task vectors. Which 1-D tensors are norm scales
  is decided by ``norm_pattern`` (the reference's LLM port: "norm" in the name and ``.weight`` at its end; here also
  open_clip's ``ln_1.weight`` style).
- The eigenvectors are taken in descending order of eigenvalue. The port as read takes ``eigenvectors[:, :r]`` of
  ``torch.linalg.eigh``, whose order is ascending: the *least* conflicting directions, and, in its fractional
  branch, a count of positive eigenvalues applied to the most negative ones. The paper's derivation and the
  fractional branch (whose count only makes sense on a descending order, as in the GPM code it follows) both say
  descending; the scratch comparison (docs/strategies.md) reports both readings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.strategies.base import NoContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import check_number, check_pattern
from lightning_merge.strategies.functional import rounding_noise
from lightning_merge.strategies.registry import Reference

#: the default ``norm_pattern``: "norm" or an ``ln``-named module (``ln_1``, ``ln_f``) whose ``.weight`` it is
NORM_SCALES = r"(?i)(norm|(^|[._])ln)[^.]*\.weight$"


def removal_basis(gram: Tensor, ratio: float) -> Tensor | None:
    """The columns of CAT's removal basis from a symmetric (out × out) conflict matrix G (float64 in and out), or
    None when G has no positive eigenvalue or the rule keeps no direction.

    Args:
        gram: Gᵢ of the module docstring.
        ratio: −1 (every positive eigenvalue), a fraction in (0, 1) (the leading positive eigenvalues whose
            cumulative squared share stays below it), or an integer ≥ 1 (that many leading eigenvectors).
    """
    symmetric = gram + gram.T
    values, vectors = torch.linalg.eigh(symmetric.div_(2))
    del symmetric
    values = values.flip(0)  # descending
    # eigenvalues within rounding of zero (G's numerical null space): their eigenvectors are a basis of that space
    # which LAPACK picks freely (another machine picks another), so they count as neither positive nor taken apart
    tiny = float(values.abs().max()) * values.numel() * torch.finfo(values.dtype).eps
    positive = values > tiny
    if not bool(positive.any()):
        return None
    if ratio == -1:
        r = int(positive.sum())  # the positive eigenvalues lead the descending order
    elif ratio >= 1:
        r = min(int(ratio), values.numel())
        leading, through_null = int(positive.sum()), int((values >= -tiny).sum())
        if leading < r < through_null:  # part of the null space: none of it (all of it would be a defined span)
            r = leading
    else:
        energy = values[positive].square()
        r = int((torch.cumsum(energy / energy.sum(), 0) < ratio).sum())
    if r == 0:
        return None
    # the r leading eigenvectors copied out (out × r): a view would keep the whole (out × out) matrix alive
    return vectors[:, vectors.shape[1] - r:].flip(1)


def trim_linear(taus: Sequence[Tensor], grams: Sequence[Tensor], lambd: float, ratio: float,
                floors: Sequence[float] | None = None) -> list[Tensor]:
    """CAT's linear-weight rule: each (out, in) task vector with its conflicting output directions projected out
    and its norm restored (module docstring), from each task's (in, in) input Gram matrix. Float64 inside; returns
    float32. A task vector of zeros (an adapter that leaves the tensor unchanged) adds nothing to any Gᵢ and is
    left out of them: no Gᵢ is formed from zeros alone (out × out: vocabulary² for an LM head). ``floors``: each
    task vector's rounding noise (:func:`~lightning_merge.strategies.functional.rounding_noise` of its weights): a
    projection that leaves no more than that has left only noise, and is skipped."""
    n = len(taus)
    live = [bool(tau.any()) for tau in taus]
    if not any(live):
        return [tau.float() for tau in taus]
    t = [tau.double() for tau in taus]
    bases = []
    for i in range(n):
        conflict = None
        for j in range(n):
            if j != i and live[j]:
                # the Grams are made float64 where used (n float64 (in × in) copies held would cost more than the
                # task vectors on a wide weight such as an MLP's down projection)
                term = t[j] @ (grams[i].double() - lambd * grams[j].double()) @ t[j].T
                conflict = term if conflict is None else conflict.add_(term)
                del term
        bases.append(None if conflict is None else removal_basis(conflict, ratio))
        del conflict
    out = []
    for j in range(n):
        vec = t[j]
        for i in range(n):
            if i == j or bases[i] is None or not live[j]:
                continue
            kept = vec - bases[i] @ (bases[i].T @ vec)
            kept_norm, norm = torch.linalg.vector_norm(kept), torch.linalg.vector_norm(vec)
            # nothing left but rounding (below the float32 output's resolution of vec): the projection is skipped,
            # not the noise blown up to vec's norm
            if kept_norm > max(float(norm) * torch.finfo(torch.float32).eps, floors[j] if floors else 0.0):
                vec = kept * (norm / kept_norm)
        out.append(vec.float())
    return out


def trim_shift(taus: Sequence[Tensor], ratio_bias: float) -> list[Tensor]:
    """CAT's rule for biases and other 1-D tensors: task i's largest τᵢ² entries (the reference's kthvalue rule,
    module docstring) zeroed in every other task's vector."""
    n = len(taus)
    keep = [torch.ones_like(tau, dtype=torch.bool) for tau in taus]
    for i in range(n):
        if n == 1:
            break
        score = taus[i].square().reshape(-1)
        size = score.numel()
        k = size - int(ratio_bias) if ratio_bias >= 1 else int(size * (1 - ratio_bias))
        k = max(1, min(k, size))
        threshold = torch.kthvalue(score, k).values
        below = (score < threshold).reshape(taus[i].shape)
        for j in range(n):
            if j != i:
                keep[j] &= below
    return [tau * mask for tau, mask in zip(taus, keep)]


@dataclasses.dataclass(frozen=True)
class CATMerging(Strategy):
    """CAT Merging: task arithmetic on task vectors trimmed of the components that conflict with the other tasks
    (see the module docstring), the linear weights' trimming computed from the experts' ``gram`` statistics
    (``CurvatureCapture(gram=...)``).

    Args:
        scale: λ in θ = θ₀ + λ Σⱼ τ̃ⱼ (the reference's ``scaling_coef``, 0.4).
        lambd: the weight of each task's own knowledge against the conflict it causes (the reference's ``lambd``,
            5.0); larger keeps more of each task vector.
        ratio: how many conflicting directions are removed per task from each linear weight: an integer c ≥ 1 (the
            reference's default, 4), a fraction in (0, 1) of the conflict's squared eigenvalues, −1 for every
            positive one, 0 for none.
        ratio_bias: how many entries of each other task's biases (and other 1-D tensors that are not norm scales)
            are zeroed per task: an integer ≥ 1 (the reference's default, 4; its kthvalue rule zeroes ratio_bias + 1
            entries), a fraction in (0, 1), or 0 for none.
        norm_pattern: a regular expression (``re.search``) naming the 1-D normalisation scales, which keep their
            task vectors (the reference's ``ratio_ln`` masking needs statistics not captured: module docstring);
            None treats every 1-D tensor as a bias.
    """

    name = "cat_merging"
    reference = Reference("https://arxiv.org/abs/2505.06977", ("https://github.com/SunWenJu123/model-merging",))
    requires = ("gram",)
    scalable = True

    scale: float = 0.4
    lambd: float = 5.0
    ratio: float = 4
    ratio_bias: float = 4
    norm_pattern: str | None = NORM_SCALES

    def __post_init__(self) -> None:
        check_number(type(self), "scale", self.scale)
        check_number(type(self), "lambd", self.lambd, low=0.0)
        check_number(type(self), "ratio", self.ratio, low=-1.0)
        if not (self.ratio in (-1, 0) or 0 < self.ratio < 1 or float(self.ratio).is_integer()):
            raise ValueError(f"CATMerging.ratio must be -1, 0, a fraction in (0, 1) or an integer >= 1, got "
                             f"{self.ratio!r}")
        check_number(type(self), "ratio_bias", self.ratio_bias, low=0.0)
        if not (self.ratio_bias < 1 or float(self.ratio_bias).is_integer()):
            raise ValueError(f"CATMerging.ratio_bias must be 0, a fraction in (0, 1) or an integer >= 1, got "
                             f"{self.ratio_bias!r}")
        check_pattern(type(self), "norm_pattern", self.norm_pattern)

    def is_norm_scale(self, name: str) -> bool:
        """Whether 1-D tensor ``name`` is a normalisation scale (kept as its task vectors)."""
        return self.norm_pattern is not None and re.search(self.norm_pattern, name) is not None

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        taus = [t - base for t in tensors]
        if len(taus) > 1 and taus[0].dim() == 2 and self.ratio != 0:
            grams = [s.get("gram") for s in stats]
            present = [g for g in grams if g is not None]
            if present:
                if len(present) < len(grams):  # on_missing_statistic="uniform": as RegMean, isotropic inputs
                    level = float(torch.stack([g.diagonal().mean() for g in present]).mean())
                    identity = torch.eye(taus[0].shape[1]) * level
                    grams = [identity if g is None else g for g in grams]
                taus = trim_linear(taus, grams, self.lambd, self.ratio, [rounding_noise(t) for t in tensors])
        elif taus[0].dim() == 1 and self.ratio_bias != 0 and not self.is_norm_scale(name):
            taus = trim_shift(taus, self.ratio_bias)
        merged = taus[0].clone()
        for tau in taus[1:]:
            merged += tau
        return merged.mul_(self.scale).add_(base)

    def working_set(self, num_experts: int) -> float:
        """:meth:`tensor_working_set` of a square weight (a tensor's own shape matters here: see there)."""
        return self.tensor_working_set(num_experts, "", (4096, 4096))  # (a bases term scales with r / in)

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """A 2-D (out × in) weight with Gram matrices, for n experts: the inputs (n + 1 copies and n (in × in) Grams),
        n float32 and n float64 task vectors (4n + 1 in all, n·in/out), and the largest of: the conflict products'
        float64 (in × in) temporaries (6·in/out), an eigendecomposition of an (out × out) float64 conflict matrix
        (the matrix, its symmetrised copy, the eigenvectors and LAPACK's workspace: 10·out/in), the trimmed task
        vectors with the projection's temporaries (n + 6). Measured 2026-12-07 (VmHWM, n = 2–4): 21–31 copies for
        512², 49–58 for 1024 × 256, 41–57 for 256 × 1024; declared with a margin, 1.05–1.15× those. The bound
        assumes Grams (a 2-D tensor without them, an embedding, holds the default's copies). 1-D tensors: 3.25n + 4.5
        (measured 9.8–16.2 for n = 2–4; the default 4n + 5 was up to 1.51× the peak at n = 3). Other tensors: the
        default."""
        default = super().working_set(num_experts)
        if len(shape) == 1 and num_experts >= 2:
            return 3.25 * num_experts + 4.5
        if len(shape) != 2 or num_experts < 2 or self.ratio == 0 or 0 in shape:
            return default
        out, inp = shape
        n = num_experts
        # the n removal bases, held together (out × r float64 each, r at most the conflict matrix's rank, (n − 1)·in):
        # r = ratio's count, or up to every direction with ratio −1 or a fraction
        r = min(out, (n - 1) * inp, int(self.ratio) if self.ratio >= 1 else out)
        bases = 2 * n * r / inp
        return max(default, 4 * n + 2 + n * inp / out + bases + max(7 * inp / out, 11 * out / inp, n + 7))

    def continual_form(self):  # noqa: D102
        raise NoContinualForm(
            "CAT Merging has no continual form: each task vector is trimmed against every other task's vector and "
            "input Gram matrix, so adding an expert changes what was removed from the earlier ones; merge the "
            "experts in one batch, or use task arithmetic, Fisher or OTA for continual merges"
        )


__all__ = ["NORM_SCALES", "CATMerging", "removal_basis", "trim_linear", "trim_shift"]
