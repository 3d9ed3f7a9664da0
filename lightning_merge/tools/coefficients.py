"""Choosing task-arithmetic coefficients without evaluation data, from the captured Fisher.

Each task's loss near its expert is modelled by the quadratic the Fisher defines (the model of Fisher merging, and
of MAP's amortised Pareto fronts, Li et al. 2024): L̂ᵢ(θ) = ½ (θ − θᵢ)ᵀ Fᵢ (θ − θᵢ). For a merge
θ(λ) = θ₀ + Σⱼ λⱼ τⱼ, each task's predicted loss *relative to the base's*,

    rᵢ(λ) = (Σⱼ λⱼτⱼ − τᵢ)ᵀ Fᵢ (Σⱼ λⱼτⱼ − τᵢ) / (τᵢᵀ Fᵢ τᵢ),

is 1 at λ = 0 (the base) and 0 at the expert's own weights. It does not depend on the scale of each expert's
Fisher, which differs between tasks (batch sizes, label counts). It is a quadratic in λ,
rᵢ(λ) = (λᵀAᵢλ − 2λᵀaᵢ)/cᵢ + 1 with (Aᵢ)ⱼₖ = τⱼᵀFᵢτₖ, (aᵢ)ⱼ = τⱼᵀFᵢτᵢ, cᵢ = τᵢᵀFᵢτᵢ. The mean over tasks is
minimised in closed form: λ* = G⁻¹b with G = Σᵢ Aᵢ/cᵢ and b = Σᵢ aᵢ/cᵢ. One streaming pass over the experts
reads every task vector and Fisher once (N² multiply-adds per entry).

Per block (``per_block=True``, blocks as LiNeS numbers them, ``layers.3``...), the same quadratic restricted to each
block's tensors gives one λ vector per block, with the tasks' normalisers cᵢ kept model-wide.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.engine.run import open_inputs, plan_merge
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic
from lightning_merge.strategies.task_vectors import TaskArithmetic

log = logging.getLogger("lightning_merge")


@dataclasses.dataclass
class QuadraticChoice:
    """The coefficients that minimise the Fisher-quadratic model of the tasks' losses, and the model itself.

    Attributes:
        weights: λ*, one coefficient per expert (the model-wide choice).
        per_block: with ``per_block=True``: ``{block: λ* for that block}`` (None for tensors outside numbered
            blocks, which use the model-wide λ*).
        experts: the experts' names, in order.
        gram: G = Σᵢ Aᵢ/cᵢ (N × N, float64).
        target: b = Σᵢ aᵢ/cᵢ.
        per_task: each task's (Aᵢ, aᵢ, cᵢ), for :meth:`predict`.
    """

    weights: list[float]
    per_block: dict[str, list[float]] | None
    experts: list[str]
    gram: Tensor
    target: Tensor
    per_task: list[tuple[Tensor, Tensor, float]]
    pattern: str = F.BLOCK_PATTERN

    def predict(self, weights: Sequence[float]) -> list[float]:
        """Each task's predicted loss for θ₀ + Σ λⱼτⱼ, relative to the base's (1 = no better than the base, 0 =
        as good as the task's own expert, under the quadratic model)."""
        lam = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        if lam.numel() != len(self.experts):
            raise ValueError(f"weights: {lam.numel()} values for {len(self.experts)} experts")
        out = []
        for a_mat, a_vec, c in self.per_task:
            out.append(float((lam @ a_mat @ lam - 2 * lam @ a_vec) / c + 1.0))
        return out

    def predicted_mean(self, weights: Sequence[float]) -> float:
        """The mean over tasks of :meth:`predict` (the quantity λ* minimises)."""
        values = self.predict(weights)
        return sum(values) / len(values)

    def strategy(self, per_block: bool = False) -> TaskArithmetic | LayerwiseTaskArithmetic:
        """Task arithmetic with these coefficients: θ₀ + Σ λ*ⱼ τⱼ (``normalize=False``, ``scale=1``); with
        ``per_block``, :class:`~lightning_merge.LayerwiseTaskArithmetic` with each block's λ* (the model-wide λ*
        elsewhere; needs ``quadratic_coefficients(..., per_block=True)``)."""
        if per_block:
            if self.per_block is None:
                raise ValueError("strategy(per_block=True) needs quadratic_coefficients(..., per_block=True)")
            return LayerwiseTaskArithmetic(coefficients={k.split()[-1]: v for k, v in self.per_block.items()},
                                           default=[float(w) for w in self.weights], pattern=self.pattern)
        return TaskArithmetic(weights=[float(w) for w in self.weights], normalize=False, scale=1.0)


def quadratic_coefficients(
    experts: Sequence[Any],
    base: Any,
    *,
    per_block: bool = False,
    pattern: str | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    ridge: float = 1e-8,
    on_missing_statistic: str = "error",
) -> QuadraticChoice:
    """Per-expert task-arithmetic coefficients chosen from the captured Fisher, without evaluation data.

    Args:
        experts: the fine-tuned models with their Fisher statistics (paths, :class:`~lightning_merge.Expert`...).
        base: the model they were fine-tuned from.
        per_block: also choose one λ vector per block (``layers.3``...); see :attr:`QuadraticChoice.per_block`.
        pattern: the regular expression that numbers blocks (default: LiNeS').
        include / exclude: glob patterns of the tensors the model covers (as for :func:`~lightning_merge.merge`).
        ridge: added to G's diagonal, relative to its mean diagonal (G is singular when two task vectors are
            parallel under every Fisher).
        on_missing_statistic: an expert without a Fisher: ``"error"``.

    Returns:
        A :class:`QuadraticChoice`: ``.weights``, ``.strategy()`` to merge with them, ``.predict(weights)``.

    Raises:
        ValueError: no base, fewer than 2 experts, an expert without a Fisher, or a task whose vector has zero Fisher
            norm (its relative loss is undefined).
    """
    from lightning_merge.strategies.curvature import Fisher

    opened, base_expert = open_inputs(experts, base)
    if base_expert is None:
        raise ValueError("quadratic_coefficients needs base= the model the experts were fine-tuned from")
    n = len(opened)
    if n < 2:
        raise ValueError(f"quadratic_coefficients needs at least 2 experts, got {n}")
    plan = plan_merge(opened, base_expert, Fisher(), include=include, exclude=exclude,
                      on_missing_statistic=on_missing_statistic)
    pattern = pattern or F.BLOCK_PATTERN

    def partial(name: str) -> tuple[Tensor, Tensor]:
        base_t = plan.base_tensor(name)
        taus = torch.stack([t - base_t for t in plan.expert_tensors(name, base_t)]).reshape(n, -1).double()
        fishers = [f.reshape(-1).double() for f in plan.statistics(name, "fisher")]
        a = torch.stack([(taus * fi) @ taus.T for fi in fishers])  # a[i] = Aᵢ restricted to this tensor
        return a, torch.stack([a[i, :, i] for i in range(n)])  # (aᵢ)ⱼ = (Aᵢ)ⱼᵢ

    parts = plan.map(partial, "Fisher quadratic")
    total_a = torch.zeros(n, n, n, dtype=torch.float64)
    blocks: dict[str, Tensor] = {}
    for name, (a, _) in parts.items():  # in plan order
        total_a += a
        index = F.block_index(name, pattern)
        if per_block and index is not None:
            key = f"block {index}"
            blocks[key] = blocks[key] + a if key in blocks else a.clone()
    c = torch.stack([total_a[i, i, i] for i in range(n)])
    bad = [opened[i].name for i in range(n) if not float(c[i]) > 0]
    if bad:
        raise ValueError(f"expert '{bad[0]}' has a zero Fisher-weighted task vector (τᵀFτ = 0): its loss model is "
                         "flat; check its statistics")
    per_task = [(total_a[i], total_a[i][:, i].clone(), float(c[i])) for i in range(n)]
    gram, target = _system(total_a, c)
    weights = _solve(gram, target, ridge)
    per_block_weights = {k: _solve(*_system(v, c), ridge)
                         for k, v in sorted(blocks.items(), key=lambda kv: int(kv[0][6:]))} if per_block else None
    log.info("quadratic coefficients: %s", ", ".join(f"{w:.3f}" for w in weights))
    return QuadraticChoice(weights, per_block_weights, [e.name for e in opened], gram, target, per_task, pattern)


def _system(a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """G = Σᵢ Aᵢ/cᵢ and b = Σᵢ aᵢ/cᵢ ((aᵢ)ⱼ = (Aᵢ)ⱼᵢ) from the per-task matrices ``a`` (n, n, n)."""
    n = a.shape[0]
    return sum(a[i] / c[i] for i in range(n)), torch.stack([a[i][:, i] / c[i] for i in range(n)]).sum(0)


def _solve(gram: Tensor, target: Tensor, ridge: float) -> list[float]:
    """λ = (G + ridge·mean(diag G)·I)⁻¹ b."""
    n = gram.shape[0]
    scale = float(torch.diagonal(gram).mean()) or 1.0
    lam = torch.linalg.solve(gram + ridge * scale * torch.eye(n, dtype=gram.dtype), target)
    return [float(x) for x in lam]


__all__ = ["QuadraticChoice", "quadratic_coefficients"]
