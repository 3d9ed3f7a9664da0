"""Interpolation on the sphere, as mergekit 0.1.5 defines it: :class:`Slerp` (one expert and the base),
:class:`NuSlerp` (two experts, optionally as task vectors), :class:`MultiSlerp` (any number, as task vectors when a
base is given) and :class:`Karcher` (the Riemannian mean of the models on the unit sphere).

Each rule is per tensor, float32, deterministic. None is linear in the experts (its coefficients depend on the
angles between them), none has a ``scale``, and none folds experts one at a time (docs/strategies.md says why for
each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies.base import ContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import (
    PerExpert,
    check_bool,
    check_expert_count,
    check_int,
    check_number,
    normalizing_sum,
)
from lightning_merge.strategies.registry import MERGEKIT, Reference

#: above this |cos θ| mergekit's slerp interpolates linearly (the two are almost parallel or antiparallel)
DOT_THRESHOLD = 0.9995


def _interpolate(t: float, v0: Tensor, v1: Tensor, cos: Tensor, parallel: Tensor) -> Tensor:
    """``sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` with ``θ = acos(cos)``, and ``(1−t)v0 + t v1`` where
    ``parallel``; ``cos`` and ``parallel`` broadcast against ``v0`` (one angle per tensor, row or column)."""
    theta = torch.acos(torch.where(parallel, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    c0 = torch.where(parallel, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(parallel, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0 * v0 + c1 * v1


def slerp(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """mergekit's ``slerp``: the whole tensors as two vectors; linear when ``|cos θ| > 0.9995``.

    Norms at most ``eps`` count as 1 (a zero tensor has cos θ = 0 with anything)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    cos = torch.dot(a / na, b / nb).clamp(-1.0, 1.0)
    return _interpolate(t, v0, v1, cos, cos.abs() > DOT_THRESHOLD)


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, row_wise: bool = False,
            eps: float = 1e-8) -> Tensor:
    """mergekit's ``nuslerp``: spherical interpolation of the whole tensors (``flatten``), else of each vector
    along the last axis (rows of a weight), or along the first (its columns) when ``row_wise``; linear where
    ``1 − cos²θ ≤ eps²``. A vector's norm is clamped to at least 1e-7 before it is normalised."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    out = _interpolate(t, v0, v1, cos, (1 - cos.square()) <= eps * eps)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _weights(strategy: Strategy, n: int) -> list[float]:
    return [strategy.per_expert("weights", i, 1.0) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Slerp(Strategy):
    """Spherical linear interpolation from the base (t = 0) to one expert (t = 1), mergekit's ``slerp``.

    Each tensor is one vector: ``θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁`` with ``cos Ω`` the cosine between
    the two whole tensors (not their task vectors); linear interpolation where ``|cos Ω| > 0.9995``.

    Args:
        t: the interpolation factor (mergekit's ``t``; a recipe must give it, as mergekit requires; 0.5 by default
            in Python). Values outside [0, 1] extrapolate.
    """

    name = "slerp"
    reference = Reference("https://en.wikipedia.org/wiki/Slerp", (MERGEKIT + "slerp.py",))

    t: float = 0.5

    def __post_init__(self) -> None:
        check_number(type(self), "t", self.t)

    def check_num_experts(self, num_experts: int) -> None:
        check_expert_count(type(self), num_experts, 1, 1, "slerp interpolates the base and one model; for more "
                           "models use multislerp or karcher")

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        self.check_num_experts(len(tensors))
        return slerp(self.t, base, tensors[0])

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'slerp' has no continual form: it interpolates the base and exactly one "
                              "expert, so there is nothing to fold in one at a time; merge the expert with merge()")


@dataclasses.dataclass(frozen=True)
class NuSlerp(Strategy):
    """Spherical interpolation of two experts, mergekit's ``nuslerp``; of their task vectors when a base is given
    (``θ = θ₀ + nuslerp(t, τ₁, τ₂)``), else of the experts' weights.

    ``t = w₂ / (w₁ + w₂)`` (0.5 when ``|w₁ + w₂| < 1e-6``).

    Args:
        weights: the two experts' weights (mergekit's per-model ``weight``, which a recipe must give); None: equal.
        nuslerp_flatten: interpolate each tensor as one vector (mergekit's default); False: per vector along an axis.
        nuslerp_row_wise: without flattening, interpolate the vectors along the first axis (a weight's columns)
            instead of the last (its rows); mergekit's names and default.
    """

    name = "nuslerp"
    reference = Reference("https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
                          (MERGEKIT + "nuslerp.py",))
    needs_base = False

    weights: PerExpert = None
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True)
        check_bool(type(self), "nuslerp_flatten", self.nuslerp_flatten)
        check_bool(type(self), "nuslerp_row_wise", self.nuslerp_row_wise)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def check_num_experts(self, num_experts: int) -> None:
        check_expert_count(type(self), num_experts, 2, 2, "nuslerp interpolates two models; for more use "
                           "multislerp or karcher, for one model and the base slerp")
        super().check_num_experts(num_experts)

    def interpolation_factor(self) -> float:
        """``t = w₂ / (w₁ + w₂)``, or 0.5 when the weights sum to (almost) 0."""
        w0, w1 = _weights(self, 2)
        total = w0 + w1
        return 0.5 if abs(total) < 1e-6 else w1 / total

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        self.check_num_experts(len(tensors))
        t = self.interpolation_factor()
        options = dict(flatten=self.nuslerp_flatten, row_wise=self.nuslerp_row_wise)
        if base is None:
            return nuslerp(t, tensors[0], tensors[1], **options)
        return base + nuslerp(t, tensors[0] - base, tensors[1] - base, **options)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'nuslerp' has no continual form: it interpolates exactly two experts; "
                              "for a continual state use multislerp's batch merge or linear")


@dataclasses.dataclass(frozen=True)
class MultiSlerp(Strategy):
    """Barycentric interpolation on the sphere, mergekit's ``multislerp``: of the task vectors when a base is given,
    else of the experts' weights.

    With ``xᵢ`` the vectors (whole tensors), ``uᵢ = xᵢ / (‖xᵢ‖ + eps)`` and weights ``wᵢ`` (divided by Σw when
    ``normalize_weights``): ``x = m · Σ wᵢ‖xᵢ‖``, where ``m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖`` is the weighted mean direction.
    (mergekit then maps the weighted sum of the tangent vectors at ``m`` back to the sphere; that sum,
    ``Σ wᵢ(uᵢ − (uᵢ·m)m) = M − (M·m)m``, is 0 when ``m = M/‖M‖``, so the step changes nothing but rounding.)
    One expert gives itself. Where ``‖Σ wᵢuᵢ‖ < eps`` (antipodal experts that cancel) two experts are
    interpolated linearly, ``Σ wᵢxᵢ``, as mergekit does; more are refused, naming the tensor, unless every vector is 0
    (the result is then the base; mergekit raises there too).

    Args:
        weights: one weight per expert (mergekit's per-model ``weight``, which a recipe must give); None: equal.
        normalize_weights: divide the weights by their sum (mergekit's default).
        eps: the stabiliser of the norms and of the cancellation test (mergekit's 1e-8).
    """

    name = "multislerp"
    reference = Reference("https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", (MERGEKIT + "multislerp.py",))
    needs_base = False

    weights: PerExpert = None
    normalize_weights: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_number(type(self), "weights", self.weights, per_expert=True)
        check_bool(type(self), "normalize_weights", self.normalize_weights)
        check_number(type(self), "eps", self.eps, low=0.0)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights",)

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        if len(tensors) == 1:
            return tensors[0].clone()
        xs = [t - base for t in tensors] if base is not None else list(tensors)
        weights = _weights(self, len(xs))
        if self.normalize_weights:
            total = normalizing_sum(type(self), weights)
            weights = [w / total for w in weights]
        norms = [torch.linalg.vector_norm(x) for x in xs]
        mean = torch.zeros_like(xs[0])
        for w, x, n in zip(weights, xs, norms):
            mean.add_(x / (n + self.eps), alpha=w)
        mean_norm = torch.linalg.vector_norm(mean)
        if float(mean_norm) < self.eps:
            if len(xs) != 2 and any(float(n) > 0 for n in norms):
                raise ValueError(
                    f"MultiSlerp: the weighted mean direction of tensor '{name}' is 0 (its {len(xs)} task vectors "
                    "cancel: antipodal vectors with weights that balance out); give different weights, or use karcher")
            out = xs[0] * weights[0]
            for w, x in zip(weights[1:], xs[1:]):
                out.add_(x, alpha=w)
        else:
            length = sum(w * n for w, n in zip(weights, norms))
            out = mean.mul_(length / mean_norm)
        return out if base is None else out.add_(base)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'multislerp' has no continual form: what it gives for one expert, and for "
                              "experts that cancel, depends on how many are merged in the end; use linear or "
                              "task_arithmetic for a continual state")


@dataclasses.dataclass(frozen=True)
class Karcher(Strategy):
    """The Karcher (Riemannian) mean of the experts on the unit sphere, mergekit's ``karcher``: of the models'
    weights, not of task vectors (a recipe's base model is one of the averaged models, as in mergekit).

    Per tensor, as one vector: ``uᵢ = θᵢ/‖θᵢ‖``; the vectors with ``‖θᵢ‖ > tol`` take equal weights αᵢ. From the
    normalised mean of those ``uᵢ`` (their first when that mean is shorter than ``tol``), each step moves the mean
    ``m`` along ``T = Σ αᵢ (φᵢ / sin φᵢ)(uᵢ − cos φᵢ · m)``, ``cos φᵢ = m·uᵢ`` (terms with ``φᵢ < tol`` left out):
    ``m ← cos‖T‖ m + sin‖T‖ T/‖T‖``, renormalised, until ``‖T‖ < tol`` or ``max_iter`` steps. The result is
    ``m · Σᵢ ‖θᵢ‖ / N`` (every expert's norm, a zero one included); all norms ≤ tol give zeros; one expert itself.

    Args:
        max_iter: the most steps (mergekit's default 10).
        tol: the convergence and zero-norm threshold (mergekit's default 1e-5).
    """

    name = "karcher"
    reference = Reference("https://arxiv.org/abs/2603.04972", (MERGEKIT + "karcher.py",))
    needs_base = False
    uses_base = False

    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        check_int(type(self), "max_iter", self.max_iter, low=0)
        check_number(type(self), "tol", self.tol, low=0.0)

    def merge_tensor(self, name: str, base: Tensor | None, tensors: Sequence[Tensor],
                     stats: Sequence[Mapping[str, Tensor]], prepared: Prepared | None = None) -> Tensor:
        if len(tensors) == 1:
            return tensors[0].clone()
        tol = self.tol
        flat = [t.reshape(-1) for t in tensors]
        norms = [torch.linalg.vector_norm(x) for x in flat]
        kept = [i for i, n in enumerate(norms) if float(n) > tol]
        if not kept:
            return torch.zeros_like(tensors[0])
        alpha = 1.0 / len(kept)
        units = [flat[i] / norms[i] for i in kept]
        mean = torch.zeros_like(units[0])
        for u in units:
            mean.add_(u, alpha=alpha)
        length = torch.linalg.vector_norm(mean)
        mean = units[0].clone() if float(length) < tol else mean / length
        for _ in range(self.max_iter):
            tangent = torch.zeros_like(mean)
            for u in units:
                cos = torch.dot(mean, u).clamp(-1.0, 1.0)
                phi = torch.arccos(cos)
                if float(phi) < tol:
                    continue
                tangent.add_((u - cos * mean) * (alpha * phi / torch.sin(phi)))
            step = torch.linalg.vector_norm(tangent)
            if float(step) < tol:
                break
            mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
            length = torch.linalg.vector_norm(mean)
            if float(length) > tol:
                mean = mean / length
        scale = sum(norms) / len(tensors)
        return (mean * scale).reshape(tensors[0].shape)

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm("strategy 'karcher' has no continual form: its mean on the sphere is found by "
                              "iterating over every expert at once; use linear for a continual state")


__all__ = ["DOT_THRESHOLD", "Karcher", "MultiSlerp", "NuSlerp", "Slerp", "nuslerp", "slerp"]
