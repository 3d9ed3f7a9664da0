"""Consensus merging with TALL masks (Wang et al., ICML 2024): the entries that at least k experts' task masks
keep, a preset of :class:`~lightning_merge.strategies.Generalized`. Rules: ALGORITHMS.md, "TALL masks / Consensus"."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_merge.strategies.generalized import Generalized
from lightning_merge.strategies.registry import FUSION_BENCH, Reference


@dataclasses.dataclass(frozen=True)
class Consensus(Generalized):
    """Consensus merging with TALL masks (Wang et al.).

    ``τ_MTL`` is the combined task vector (task arithmetic ``Σ λᵢτᵢ`` by default; TIES with
    ``sparsification="magnitude", density=..., election="weighted", normalize=True``). Each expert's TALL mask is
    ``mᵢ = 1[|τᵢ| > λᵢ |τ_MTL − τᵢ|]`` (where its own task vector dominates what the others add); entries that at
    least ``k`` masks keep survive: ``θ = θ₀ + scale · 1[Σ mᵢ ≥ k] ⊙ τ_MTL``. ``k = 0`` is plain τ_MTL, ``k > N``
    gives θ₀; ``k = 2`` removes "selfish" weights (one task only) and "catastrophic" ones (no task).

    For storing N experts as one task vector plus N bit-masks, see :func:`lightning_merge.tools.tall.compress`.

    Args:
        consensus_k: the number k of task masks that must keep an entry (2 in the paper).
        tall_lambda: λᵢ (0.6, FusionBench's default; the paper picks from 0.2..0.6 on validation).
        other arguments: see :class:`~lightning_merge.strategies.Generalized`.
    """

    name = "consensus"
    reference = Reference("https://arxiv.org/abs/2405.07813",
                          ("https://github.com/nik-dim/tall_masks", FUSION_BENCH + "tall_mask"))

    consensus_k: int | None = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.consensus_k is None:
            raise ValueError("Consensus.consensus_k must be an integer >= 0 (Generalized has consensus off)")

    @classmethod
    def tall_reference(cls, consensus_k: int = 2, tall_lambda: Any = 0.6, density: float = 0.2,
                       scale: float = 1.0) -> Consensus:
        """Consensus over TIES as the TALL reference code builds τ_MTL: a model-wide top-``density`` trim of each
        task vector (``topk="model"``), the sign elected on the unweighted sum, and the disjoint *sum* of the
        agreeing entries (not their mean). The default :class:`Consensus` over TIES trims per tensor and takes the
        disjoint mean (``normalize=True``), as mergekit's TIES does; the reference's sum is larger, so its best
        ``scale`` is smaller.

        Args:
            consensus_k: k, the masks that must keep an entry.
            tall_lambda: λᵢ of the TALL masks.
            density: the fraction of each task vector's entries kept, over the whole model.
            scale: α, the step along the masked τ_MTL (the paper tunes it).
        """
        return cls(sparsification="magnitude", density=density, topk="model", election="unweighted",
                   normalize=False, consensus_k=consensus_k, tall_lambda=tall_lambda, scale=scale)


__all__ = ["Consensus"]
