"""The statistics sidecar: on-disk format, reading, and the merge-ready transformations.

A sidecar is one safetensors file (see docs/format.md):

- ``X.statistics.safetensors`` next to a file ``X.ckpt`` / ``X.safetensors``; ``statistics.safetensors`` inside a
  folder (Hugging Face model, PEFT adapter).
- Tensor keys ``{kind}/{parameter name}``; rank-1 compressed 2-D statistics as ``{kind}/{name}:row`` and
  ``{kind}/{name}:col`` (row and column sums).
- ``__metadata__``: ``format`` (:data:`FORMAT`), ``format_version``, ``library_version``, ``names_checksum``
  and ``kinds``, a JSON object with one entry per kind (estimator, counts, batch size, β₂ and step per
  parameter, compression).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "lightning-merge/statistics"
FORMAT_VERSION = 1
SIDECAR_NAME = "statistics.safetensors"
SIDECAR_SUFFIX = ".statistics.safetensors"
FISHER_ESTIMATORS = ("true", "example", "batch")  # preference order when a capture holds several
KNOWN_KINDS = ("fisher", "exp_avg_sq")


def sidecar_path(source: str | os.PathLike) -> Path:
    """Where the statistics of ``source`` live: inside a folder, or ``X.statistics.safetensors`` next to a file."""
    source = Path(source)
    if source.is_dir():
        return source / SIDECAR_NAME
    name = source.name
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return source.with_name(name + SIDECAR_SUFFIX)


def names_checksum(names: Iterable[str]) -> str:
    """sha256 of the sorted parameter names, newline-joined (recorded so mismatched sidecars are caught)."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def rank1_reconstruct(row: Tensor, col: Tensor) -> Tensor:
    """Adafactor reconstruction ``r cᵀ / (1ᵀ v 1)`` from row sums ``r`` and column sums ``c`` (0 when the sum is 0)."""
    row = row.to(torch.float32)
    col = col.to(torch.float32)
    total = row.sum()
    if total <= 0:
        return torch.zeros(row.numel(), col.numel(), dtype=torch.float32)
    return torch.outer(row, col) / total


class StatisticsError(ValueError):
    """A sidecar that is missing, corrupted, or does not match its expert."""


class Statistics:
    """Merge-ready view of captured statistics, from a sidecar file or an in-memory mapping.

    Args:
        tensors: raw tensors keyed ``{kind}/{name}`` (or ``:row`` / ``:col`` halves).
        kinds: per-kind metadata (see the module docstring).
        origin: where they came from, for error messages.
    """

    def __init__(self, tensors: Mapping[str, Tensor] | Any, kinds: Mapping[str, Mapping[str, Any]], origin: str):
        self._tensors = tensors
        self.kinds: dict[str, dict[str, Any]] = {k: dict(v) for k, v in kinds.items()}
        self.origin = origin
        self.metadata: dict[str, str] = {}  # the file's __metadata__ (set by load)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Open a sidecar (memory-mapped; tensors are read on demand).

        Raises:
            StatisticsError: the file is not a readable sidecar of a supported version.
        """
        from safetensors import safe_open

        path = Path(path)
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise StatisticsError(
                f"statistics file '{path}' is truncated or corrupted ({err}); delete it and capture again"
            ) from err
        if meta.get("format") != FORMAT:
            raise StatisticsError(f"'{path}' is not a lightning-merge statistics file (format={meta.get('format')!r})")
        version = int(meta.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise StatisticsError(
                f"'{path}' uses statistics format version {version}; this lightning-merge reads up to "
                f"{FORMAT_VERSION}: upgrade lightning-merge"
            )
        try:
            kinds = json.loads(meta.get("kinds", "{}"))
        except json.JSONDecodeError as err:
            raise StatisticsError(f"'{path}': metadata 'kinds' is not valid JSON ({err})") from err
        stats = cls(_SafeOpenMapping(handle), kinds, str(path))
        stats.metadata = meta
        return stats

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], origin: str = "<in-memory statistics>") -> Statistics:
        """Build from ``{"kinds": {...}, "tensors": {...}}``, or a :class:`Statistics`, or plain
        ``{kind: {name: tensor}}`` (merge-ready values, no metadata)."""
        if isinstance(mapping, Statistics):
            return mapping
        if "tensors" in mapping and "kinds" in mapping:
            return cls(dict(mapping["tensors"]), mapping["kinds"], origin)
        tensors: dict[str, Tensor] = {}
        kinds: dict[str, dict[str, Any]] = {}
        for kind, per_name in mapping.items():
            kinds[kind] = {"ready": True}
            for name, value in per_name.items():
                tensors[f"{kind}/{name}"] = value
        return cls(tensors, kinds, origin)

    # -- queries ------------------------------------------------------------------------------------------------
    def _resolve_kind(self, kind: str, estimator: str | None) -> str:
        if kind in self.kinds:
            return kind
        if kind == "fisher":
            if estimator is not None:
                stored = f"fisher.{estimator}"
                if stored in self.kinds:
                    return stored
                raise StatisticsError(
                    f"{self.origin} has no Fisher estimator {estimator!r}; it holds "
                    f"{', '.join(sorted(self.kinds)) or 'no statistics'}"
                )
            for est in FISHER_ESTIMATORS:
                if f"fisher.{est}" in self.kinds:
                    return f"fisher.{est}"
        raise StatisticsError(
            f"{self.origin} has no statistic {kind!r}; it holds {', '.join(sorted(self.kinds)) or 'no statistics'}"
        )

    def keys(self) -> Iterable[str]:
        """The raw tensor keys (``{kind}/{name}``, ``:row`` / ``:col`` halves)."""
        return self._tensors.keys()

    def has(self, kind: str) -> bool:
        """Whether statistics of ``kind`` (``"fisher"`` matches any Fisher estimator) are present."""
        try:
            self._resolve_kind(kind, None)
        except StatisticsError:
            return False
        return True

    def names(self, kind: str, estimator: str | None = None) -> list[str]:
        """Parameter names that have a statistic of ``kind``."""
        stored = self._resolve_kind(kind, estimator)
        prefix = stored + "/"
        out = []
        for key in self._tensors.keys():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name.endswith(":col"):
                    continue
                out.append(name[: -len(":row")] if name.endswith(":row") else name)
        return out

    def raw(self, name: str, kind: str, estimator: str | None = None) -> Tensor:
        """The stored tensor in float32 (rank-1 halves reconstructed), before any correction."""
        stored = self._resolve_kind(kind, estimator)
        key = f"{stored}/{name}"
        if key in self._tensors:
            return self._tensors[key].to(torch.float32)
        if f"{key}:row" in self._tensors:
            return rank1_reconstruct(self._tensors[f"{key}:row"], self._tensors[f"{key}:col"])
        raise StatisticsError(f"{self.origin} has no {stored!r} statistic for tensor '{name}'")

    def get(self, name: str, kind: str, estimator: str | None = None) -> Tensor:
        """The merge-ready float32 statistic of tensor ``name``.

        ``exp_avg_sq`` is bias-corrected with the β₂ and the per-parameter step recorded at capture; the
        batch-empirical Fisher is multiplied by the global effective batch size; other kinds are returned as
        stored. See docs/format.md and ALGORITHMS.md.
        """
        stored = self._resolve_kind(kind, estimator)
        value = self.raw(name, kind, estimator)
        meta = self.kinds.get(stored, {})
        if meta.get("ready"):
            return value
        if stored == "exp_avg_sq":
            beta2 = _per_name(meta, "beta2", name, self.origin)
            step = _per_name(meta, "step", name, self.origin)
            if step <= 0:
                raise StatisticsError(f"{self.origin}: tensor '{name}' has exp_avg_sq but step {step}")
            return value / (1.0 - beta2**step)
        if stored == "fisher.batch":
            return value * float(meta.get("batch_size", 1))
        return value


def _per_name(meta: Mapping[str, Any], key: str, name: str, origin: str) -> float:
    value = meta.get(key)
    if isinstance(value, Mapping):
        if name not in value:
            raise StatisticsError(f"{origin}: metadata '{key}' has no entry for tensor '{name}'")
        return float(value[name])
    if value is None:
        raise StatisticsError(f"{origin}: metadata '{key}' is missing; the sidecar is incomplete")
    return float(value)


class _SafeOpenMapping(Mapping):
    """A read-only mapping over a safetensors ``safe_open`` handle."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
