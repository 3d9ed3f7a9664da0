"""``Generalized``: the composable preset of the task-vector engine: any sparsification, with or without sign
election, a TALL consensus mask, and scalar or curvature weights. Rules: ALGORITHMS.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Prepared
from lightning_merge.strategies.cabs import check_order
from lightning_merge.strategies.checks import PerExpert, check_choice, check_int, check_number, set_field
from lightning_merge.strategies.registry import MERGEKIT, Reference
from lightning_merge.strategies.sparsify import OVERLAPS, SCOPES, SPARSIFIERS, Sparsification
from lightning_merge.strategies.task_vectors import TaskVectorMerge, _check_density

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


@dataclasses.dataclass(frozen=True)
class Generalized(TaskVectorMerge):
    """The composable task-vector merge: any sparsification, with or without sign election, a consensus mask,
    and scalar or curvature weights; mergekit's "generalized task arithmetic" with this project's pieces.

    ``θ = θ₀ + scale · consensus(combine(sparsify(τᵢ)))``. Examples:

    * ``Generalized(sparsification="saliency", density=0.2, election="weighted", normalize=True)``: Fast Fisher
      Grafting's saliency mask (``v̂ ⊙ τ²``) in place of TIES' magnitude trim.
    * ``Generalized(sparsification="random", density=0.5, weighting="fisher")``: DARE with Fisher weights.
    * ``Generalized(sparsification="cabs", density=0.25, consensus_k=2)``: CABS masks, then TALL consensus.

    Args:
        sparsification: a method of :data:`~lightning_merge.strategies.sparsify.SPARSIFIERS`: ``"none"``,
            ``"magnitude"`` (TIES' top-k of |τ|), ``"random"`` (DARE's Bernoulli drop), ``"breadcrumbs"`` (drop the
            ``gamma`` largest too), ``"cabs"`` (conflict-aware n:m with ``n = round(density·group_size)``) or
            ``"saliency"`` (top-k of ``statistic ⊙ τ²`` per tensor, FFG's rule).
        density: fraction kept (one number, or one per expert except for ``"cabs"``).
        rescale: ``"none"``, ``"inverse"`` or ``"l1"`` (see :class:`~lightning_merge.strategies.TaskVectorMerge`);
            None: ``"inverse"`` for ``"random"`` (DARE's rule) and ``"none"`` otherwise.
        topk: ``"magnitude"`` per ``"tensor"`` or over the whole ``"model"`` per expert.
        gamma: Breadcrumbs' fraction of largest entries dropped.
        group_size: CABS' m.
        order: CABS' pruning order.
        last_group: CABS' rule for a tensor's last incomplete group (``"density"``, ``"pad"`` or ``"drop"``; see
            :class:`~lightning_merge.strategies.Cabs`).
        overlap: CABS' rule for a group with fewer than n free positions (``"fill"`` or ``"free_only"``).
        saliency: the statistic of the ``"saliency"`` rule: ``"exp_avg_sq"`` (FFG) or ``"fisher"``.
        seed: seeds the ``"random"`` masks per (seed, tensor, expert).
        consensus_k: None for no consensus; otherwise keep only entries where at least k TALL task masks
            agree (see :class:`~lightning_merge.strategies.Consensus`).
        tall_lambda: λᵢ of the TALL masks, one number or one per expert.
        weights, scale, normalize, election, weighting: see :class:`~lightning_merge.strategies.TaskVectorMerge`.
    """

    name = "generalized"
    reference = Reference("https://arxiv.org/abs/2403.13257", (MERGEKIT + "generalized_task_arithmetic.py",))

    sparsification: str = "none"
    density: float | list[float] = 1.0
    rescale: str | None = None
    topk: str = "tensor"
    gamma: float = 0.01
    group_size: int = 256
    order: list[int] | None = None
    last_group: str = "density"
    overlap: str = "fill"
    saliency: str = "exp_avg_sq"
    seed: int = 0
    consensus_k: int | None = None
    tall_lambda: PerExpert = 0.6

    def __post_init__(self) -> None:
        owner = type(self)
        check_choice(owner, "sparsification", self.sparsification, tuple(SPARSIFIERS))
        if self.rescale is None:
            set_field(self, "rescale", "inverse" if self.sparsification == "random" else "none")
        super().__post_init__()
        _check_density(owner, self.density)
        check_choice(owner, "topk", self.topk, SCOPES)
        check_number(owner, "gamma", self.gamma, low=0.0, high=1.0)
        check_choice(owner, "saliency", self.saliency, ("exp_avg_sq", "fisher"))
        if self.sparsification == "cabs":
            if isinstance(self.density, (list, tuple)):
                raise ValueError(f"{owner.__name__}: CABS takes one density for all experts (n:m is shared)")
            if self.election is not None:
                raise ValueError(f"{owner.__name__}: CABS masks (nearly) never overlap; leave election=None")
        check_int(owner, "group_size", self.group_size, low=1)
        check_choice(owner, "last_group", self.last_group, F.LAST_GROUP_RULES)
        check_choice(owner, "overlap", self.overlap, OVERLAPS)
        if self.consensus_k is not None:
            check_int(owner, "consensus_k", self.consensus_k, low=0)
        check_number(owner, "tall_lambda", self.tall_lambda, low=0.0, per_expert=True)

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification(
            self.sparsification, density=self.density, gamma=self.gamma, scope=self.topk, seed=self.seed,
            m=self.group_size, order=self.order, last_group=self.last_group, overlap=self.overlap,
            statistic=self.saliency, rescale=self.rescale,
        )

    @property
    def consensus(self) -> bool:
        return self.consensus_k is not None

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "tall_lambda")

    def prepare(self, plan: MergePlan) -> Prepared:
        check_order(type(self), self.order, plan.num_experts)
        return super().prepare(plan)

    def finish(self, name: str, mixed: Tensor, base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        if self.consensus_k is None:
            return mixed
        tau = torch.stack([t - base for t in tensors])
        lambdas = [self.per_expert("tall_lambda", i, 0.6) for i in range(len(tensors))]
        votes = F.tall_masks(tau, mixed, lambdas).sum(0)
        return mixed.mul_(votes >= self.consensus_k)

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """As the task-vector engine's, and with consensus ``tall_kept``: the density of each expert's TALL mask
        (from the merged task vector before ``scale``, as the masks are drawn)."""
        if self.consensus_k is None:
            return super().diagnose(plan, name, taus, merged)
        n = taus.shape[0]
        lambdas = [self.per_expert("tall_lambda", i, 0.6) for i in range(n)]
        masks = F.tall_masks(taus, merged / self.scale if self.scale else merged, lambdas)
        tall = [float(m.double().mean()) for m in masks.reshape(n, -1)]
        del masks
        out = super().diagnose(plan, name, taus, merged)  # sparsifies taus in place: after the masks
        return {"merged_norm": out.pop("merged_norm"), "tall_kept": tall, **out}


__all__ = ["Generalized"]
