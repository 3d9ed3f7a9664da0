"""The records a curvature capture passes around: what it would store now (:class:`Collected`), Gram-matrix totals
(:class:`GramTotals`), the result of a post-fit Fisher pass (:class:`FisherPass`), and what a checkpoint sidecar is
written from (:class:`SidecarSnapshot`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from lightning_merge.formats.adapter import AdapterSnapshot


@dataclasses.dataclass
class Collected:
    """Everything to store at one moment, as :func:`~lightning_merge.formats.sidecar.write_statistics` takes it.

    Attributes:
        statistics: ``{kind: {parameter name: tensor}}`` (float32, on the CPU).
        kinds: ``{kind: metadata}`` (JSON values).
        resume: ``{kind: {parameter name: float32 accumulator}}`` of the kinds stored lossy, so a resumed run
            continues exactly (checkpoint sidecars only).
    """

    statistics: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    kinds: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    resume: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GramTotals:
    """Σ xxᵀ per linear layer, summed over ranks (and a restored checkpoint).

    Attributes:
        sums: ``{weight name: Σ xxᵀ}`` (float32, on the CPU).
        rows: ``{weight name: input rows counted}``.
        examples: examples the post-fit pass read (0 for training-time sums).
    """

    sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: int = 0


@dataclasses.dataclass
class FisherPass:
    """A post-fit Fisher pass.

    Attributes:
        values: ``{parameter name: mean squared per-example gradient}``.
        count: the examples M it averaged over, all ranks together (0: it saw none, and is left out).
    """

    values: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    count: int = 0


@dataclasses.dataclass
class SidecarSnapshot:
    """What the sidecar (and adapter folder) of one checkpoint is written from, taken when it was saved.

    Attributes:
        collected: the statistics.
        metadata: the sidecar's file metadata.
        adapter: the PEFT adapter's weights and config, or None without PEFT.
        checkpoint: the checkpoint's path (the adapter folder goes beside it).
    """

    collected: Collected
    metadata: dict[str, str]
    adapter: AdapterSnapshot | None
    checkpoint: str


__all__ = ["Collected", "FisherPass", "GramTotals", "SidecarSnapshot"]
