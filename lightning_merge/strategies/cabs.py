"""CABS: conflict-aware, balanced (n:m) sparsification of the task vectors, a preset of the task-vector engine
(Yang et al., ICML 2025). Rules: ALGORITHMS.md, "CABS"."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Prepared
from lightning_merge.strategies.checks import Owner, check_choice, owner_name
from lightning_merge.strategies.registry import Reference
from lightning_merge.strategies.sparsify import OVERLAPS, Sparsification
from lightning_merge.strategies.task_vectors import TaskVectorMerge

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


def check_order(owner: Owner, order: list[int] | None, n: int) -> None:
    """Validate a pruning order against the number of experts ``n``: every index 0..n−1 once (None: the given order).
    """
    if order is not None and sorted(order) != list(range(n)):
        raise ValueError(
            f"{owner_name(owner)}.order must list every expert index 0..{n - 1} once (the pruning order), got {order!r}"
        )


@dataclasses.dataclass(frozen=True)
class Cabs(TaskVectorMerge):
    """CABS: conflict-aware, balanced sparsification, then task arithmetic.

    Balanced (n:m): each run of ``m`` consecutive entries of a task vector (row-major) keeps its ``n`` largest
    magnitudes. Conflict-aware: experts are pruned one after another in ``order``; each chooses only among the
    positions no earlier expert took, so at density ≤ 1/N the kept task vectors are disjoint
    (``⟨τ₁', τ₂'⟩ = 0``) and no rescaling is needed. ``θ = θ₀ + scale · Σ λₖ τₖ'``. Both references agree on
    these rules: the official scripts (github.com/zongzhenyang/CABS) and the mergekit CABS plugin
    (``mergekit/merge_methods/cabs.py``).

    Where the references disagree (docs/strategies.md, "CABS", says which follows which):

    - a tensor's last incomplete group of ``g < m`` entries (``last_group``; a tensor smaller than ``m`` is one
      such group): ``"density"`` keeps ``ceil(n·g/m)`` (the same density; this project's rule, the default),
      ``"pad"`` keeps ``min(n, g)`` (n of the group zero-padded to ``m``: the mergekit plugin), ``"drop"`` keeps
      none (the official RoBERTa script skips the group; the 7B script cannot split such a tensor);
    - a group with fewer free positions than ``n`` (n·N > m; ``overlap``): ``"fill"`` keeps the free positions
      and completes n with the largest ``|τ|`` among the taken ones, so the parts overlap and add (the official 7B
      script's branch for n ≥ m/2, which completes up to m/2 from the taken positions; the two agree at its
      default 96:128; the default), ``"free_only"`` keeps only the free positions (the mergekit plugin and the
      official RoBERTa script: there a later expert's top-n falls on entries zeroed by the earlier masks).

    A kept zero takes no position (in both references it would: documented in docs/strategies.md). Ties are
    broken by the lower flat index.

    Args:
        n: entries kept per group (the paper's 64 of 256 on 7B models, 3 of 32 on RoBERTa).
        m: group size.
        order: the pruning order as a list of expert indices (the first expert chooses freely); None keeps the
            given order. Order matters: earlier experts keep more of their own mass.
        last_group: ``"density"``, ``"pad"`` or ``"drop"``: what a tensor's last incomplete group keeps (above).
        overlap: ``"fill"`` or ``"free_only"``: what a group with fewer than ``n`` free positions keeps (above).
        weights: λₖ per expert (the paper used 1.2 each on 7B models), or None for 1.
        scale: a global step along the merged task vector.
        weighting: ``"fisher"`` / ``"ota"`` for a precision-weighted mean instead of the sum (see
            :class:`~lightning_merge.strategies.TaskVectorMerge`).
    """

    name = "cabs"
    reference = Reference("https://arxiv.org/abs/2503.01874", (
        "https://github.com/zongzhenyang/CABS",
        "https://github.com/arcee-ai/mergekit/blob/4c5913979e47336b1b06bd54d14017e9283c6fcb/mergekit/merge_methods/cabs.py",
    ))

    n: int = 64
    m: int = 256
    order: list[int] | None = None
    last_group: str = "density"
    overlap: str = "fill"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(type(self), "last_group", self.last_group, F.LAST_GROUP_RULES)
        check_choice(type(self), "overlap", self.overlap, OVERLAPS)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or isinstance(self.m, bool) or \
                not isinstance(self.m, int) or not 0 <= self.n <= self.m or self.m < 1:
            raise ValueError(f"Cabs needs integers 0 <= n <= m and m >= 1 (n:m sparsity), got n={self.n!r}, "
                             f"m={self.m!r}")
        if self.election is not None:
            raise ValueError("Cabs' masks (nearly) never overlap, so sign election has nothing to resolve; leave "
                             "election=None")
        if self.rescale != "none":
            raise ValueError("Cabs keeps the kept entries as they are (no rescaling); leave rescale='none'")

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification("cabs", n=self.n, m=self.m, order=self.order, last_group=self.last_group,
                              overlap=self.overlap, rescale=self.rescale)

    def prepare(self, plan: MergePlan) -> Prepared:
        check_order(type(self), self.order, plan.num_experts)
        return super().prepare(plan)


__all__ = ["Cabs", "check_order"]
