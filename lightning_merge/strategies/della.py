"""DELLA (MagPrune): drop task-vector entries at random with probabilities that grow with their magnitude rank, then
combine with TIES' sign election (mergekit's ``della``) or linearly (``della_linear``). A preset of the task-vector
engine (:mod:`lightning_merge.strategies.task_vectors`), as DARE is."""

from __future__ import annotations

import dataclasses

from lightning_merge.strategies.checks import check_choice, check_number, set_field
from lightning_merge.strategies.registry import MERGEKIT, Reference
from lightning_merge.strategies.sparsify import Sparsification, check_della
from lightning_merge.strategies.task_vectors import TaskVectorMerge


@dataclasses.dataclass(frozen=True)
class Della(TaskVectorMerge):
    """DELLA: in each row of each task vector, the entry of ascending magnitude rank r (of n) is kept with
    probability ``density − epsilon + 2·epsilon·r/(n − 1)`` (so ``density`` of the row on average, the largest most
    often), the kept entries are rescaled, and the task vectors are combined with TIES' weighted sign election
    (``combine="ties"``, mergekit's ``della``) or summed (``combine="linear"``, mergekit's ``della_linear``).

    The defaults are mergekit's. The draws are seeded per (seed, tensor name, expert index), as :class:`Dare`'s,
    so a merge does not depend on thread order; mergekit draws from torch's global generator in its own task order
    (``--random-seed``), which this does not reproduce: the same recipe gives a different sample of the same
    distribution (the expectation and the kept fraction are what agree).

    Args:
        density: the mean fraction kept, one number or one per expert (1 keeps everything: no draw at all).
        epsilon: the spread of the keep probabilities, one number or one per expert; ``density ± epsilon`` must
            lie inside (0, 1).
        combine: ``"ties"`` (weighted sign election, disjoint mean) or ``"linear"``.
        rescale: ``"l1"`` (mergekit: the kept entries' L1 norm matched to the task vector's), ``"inverse"`` (the
            paper: each kept entry divided by its own keep probability, so E[τ̂] = τ) or ``"none"``.
        seed: seeds the draws per (seed, tensor, expert).
        normalize: None chooses by ``combine`` (ties: disjoint mean; linear: plain weighted sum), as mergekit.
        election: None chooses by ``combine`` (ties: ``"weighted"``).
        weights, scale, weighting: see :class:`TaskVectorMerge` (``scale`` is mergekit's ``lambda``).
    """

    name = "della"
    reference = Reference("https://arxiv.org/abs/2406.11617",
                          ("https://github.com/declare-lab/della", MERGEKIT + "generalized_task_arithmetic.py"))

    density: float | list[float] = 1.0
    epsilon: float | list[float] = 0.15
    combine: str = "ties"
    rescale: str = "l1"
    seed: int = 0
    normalize: bool | None = None
    election: str | None = None

    def __post_init__(self) -> None:
        owner = type(self)
        check_number(owner, "density", self.density, low=0.0, high=1.0, per_expert=True)
        check_number(owner, "epsilon", self.epsilon, per_expert=True)
        check_choice(owner, "combine", self.combine, ("linear", "ties"))
        if self.election is None and self.combine == "ties":
            set_field(self, "election", "weighted")
        if self.normalize is None:
            set_field(self, "normalize", self.combine == "ties")
        super().__post_init__()
        check_della(owner, self.density, self.epsilon)

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("weights", "density", "epsilon")

    @property
    def sparsifier(self) -> Sparsification:
        return Sparsification("della", density=self.density, epsilon=self.epsilon, seed=self.seed,
                              rescale=self.rescale)


__all__ = ["Della"]
