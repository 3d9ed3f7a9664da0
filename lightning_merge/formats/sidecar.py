"""The statistics sidecar: on-disk format, reading, and the merge-ready transformations.

A sidecar is one safetensors file (see docs/format.md):

- ``X.statistics.safetensors`` next to a file ``X.ckpt`` / ``X.safetensors``; ``statistics.safetensors`` inside a
  folder (Hugging Face model, PEFT adapter).
- Tensor keys ``{kind}/{parameter name}``; rank-1 compressed 2-D statistics as ``{kind}/{name}:row`` and
  ``{kind}/{name}:col`` (row and column sums).
- The ``gram`` kind (input Gram matrices Σ xxᵀ of linear layers, for RegMean) is not of its tensor's shape: for a
  weight of shape (out, in) it is (in, in), stored whole (``gram/{name}``), as its diagonal (``gram/{name}:diag``), or
  low rank (``gram/{name}:factor`` F of shape (in, r) and ``gram/{name}:diag`` the residual diagonal: F Fᵀ + diag).
- ``__metadata__``: ``format`` (:data:`FORMAT`), ``format_version``, ``library_version``, ``names_checksum``
  and ``kinds``, a JSON object with one entry per kind (estimator, counts, batch size, β₂ and step per
  parameter, compression).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge._version import __version__
from lightning_merge.errors import MissingStatistic, StatisticsError
from lightning_merge.files.finite import all_non_negative_finite
from lightning_merge.files.ownership import marked
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.files.remote import fetch, is_url
from lightning_merge.files.safetensors import SafetensorsError, SafetensorsFile, TensorFileMapping, save_tensors
from lightning_merge.files.text import brief

FORMAT = "lightning-merge/statistics"
FORMAT_VERSION = 1
SIDECAR_NAME = "statistics.safetensors"
SIDECAR_SUFFIX = ".statistics.safetensors"
FISHER_ESTIMATORS = ("exact", "true", "example", "batch")  # preference order when a capture holds several
KNOWN_KINDS = ("fisher", "exp_avg_sq", "gram")
COMPRESSIONS = ("float32", "bfloat16", "rank1")
GRAM = "gram"  # the one statistic kind that is not of its tensor's shape (see the module docstring)
#: A request (never stored) for the ``exp_avg_sq`` as the optimizer held it, without the bias correction 1/(1 − β₂ᵗ):
#: what ``OTA(bias_correct=False)`` reads, as the OTA reference does. Merge-ready values given without metadata
#: (``{"exp_avg_sq": {...}}``) are returned as given, like the corrected request.
RAW_SECOND_MOMENTS = "exp_avg_sq.raw"
GRAM_FORMS = ("full", "diagonal", "lowrank")
_PART_SUFFIXES = (":row", ":col", ":diag", ":factor")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # X.<suffix> pairs with X.statistics.safetensors
RESUME_PREFIX = "resume/"  # float32 accumulators kept for exact resume when the statistics are compressed


def sidecar_name(filename: str) -> str:
    """The sidecar file name of a weights file (``last.ckpt`` -> ``last.statistics.safetensors``)."""
    for suffix in WEIGHT_SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename + SIDECAR_SUFFIX


def fetch_with_sidecar(url: str) -> Path:
    """The local copy of a remote model file or folder (:func:`lightning_merge.files.remote.fetch`), a file's sidecar
    fetched beside it so the copy is found with its statistics."""
    return fetch(url, companions=(sidecar_name(url.rstrip("/").rsplit("/", 1)[-1]),))


def sidecar_path(source: str | os.PathLike) -> Path | str:
    """Where the statistics of ``source`` live: inside a folder, or ``X.statistics.safetensors`` next to a file.

    For an object-storage URL (``s3://bucket/run/last.ckpt``) the answer is a URL string: a key ending in ``.ckpt``,
    ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` is a file, anything else a folder."""
    if is_url(source):
        url = str(source).rstrip("/")
        parent, _, name = url.rpartition("/")
        if name.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
            return f"{parent}/{sidecar_name(name)}"
        return f"{url}/{SIDECAR_NAME}"
    source = Path(source)
    if source.is_dir():
        return source / SIDECAR_NAME
    return source.with_name(sidecar_name(source.name))


def find_sidecar(source: str | os.PathLike) -> Path | str | None:
    """The sidecar of ``source`` if one exists; a symbolic link (``save_last="link"``) is followed to its target's
    sidecar when it has none of its own. For a URL, the sidecar's URL when that object exists. A checkpoint folder
    named like a file (a distributed checkpoint ``X.ckpt/``) has its sidecar ``X.statistics.safetensors`` beside it,
    as a file ``X.ckpt`` has (``statistics.safetensors`` inside it is found too)."""
    path = sidecar_path(source)
    if isinstance(path, str):
        return path if remote_exists(path) else None
    if path.exists():
        return path
    folder = Path(source)
    if folder.is_dir() and folder.name.endswith(WEIGHT_SUFFIXES):  # a distributed checkpoint X.ckpt/: beside it
        beside = folder.with_name(sidecar_name(folder.name))
        if beside.is_file():
            return beside
    source = Path(source)
    if source.is_symlink():
        target = sidecar_path(source.resolve())
        if target.exists():
            return target
    return None


def names_checksum(names: Iterable[str]) -> str:
    """sha256 of the sorted parameter names, newline-joined (recorded so mismatched sidecars are caught)."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def rank1_reconstruct(row: Tensor, col: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
    """Adafactor reconstruction ``r cᵀ / (1ᵀ v 1)`` from row sums ``r`` and column sums ``c`` (0 when the sum is 0);
    ``rows=(start, stop)``: those rows of it only."""
    row = row.to(torch.float32)
    col = col.to(torch.float32)
    total = row.sum()
    if rows is not None:
        row = row[rows[0]:rows[1]]
    if total <= 0:
        return torch.zeros(row.numel(), col.numel(), dtype=torch.float32)
    return torch.outer(row, col) / total


def _sample_index(numel: int, samples: int, device: Any = None) -> Tensor | None:
    """The flat indices a fingerprint samples (None: every element). linspace runs in float32: past 2**24 elements its
    last point can round up to numel (one past the end); clamped, every index a smaller tensor had stays the same, so
    recorded fingerprints keep matching."""
    if numel <= samples:
        return None
    index = torch.linspace(0, numel - 1, samples, device=device).round().long()
    return index.clamp_(max=numel - 1)


def _fingerprint(shape: Sequence[int], values: Tensor) -> str:
    data = values.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(",".join(str(d) for d in shape).encode() + b"|" + data).hexdigest()[:16]


def tensor_fingerprint(tensor: Tensor, samples: int = 256) -> str:
    """A short hash of a fixed sample of ``tensor`` (cast to float32): cheap to compute for any size, equal for
    equal tensors, different (with overwhelming probability) for tensors that moved."""
    flat = tensor.detach().reshape(-1)
    index = _sample_index(flat.numel(), samples, flat.device)
    return _fingerprint(tensor.shape, flat if index is None else flat[index])


def fingerprint_rows(read_rows: Callable[[tuple[int, int]], Tensor], shape: Sequence[int], samples: int = 256) -> str:
    """:func:`tensor_fingerprint` of a tensor of ``shape`` read only in the rows its samples fall in
    (``read_rows((start, stop))`` returns those rows): the same hash, without the whole tensor in memory."""
    numel = 1
    for d in shape:
        numel *= int(d)
    row = numel // shape[0] if len(shape) and shape[0] else max(numel, 1)
    index = _sample_index(numel, samples)
    if index is None or len(shape) < 2:
        return tensor_fingerprint(read_rows((0, int(shape[0]) if len(shape) else 0)), samples)
    by_row: dict[int, list[int]] = {}
    for i in index.tolist():  # ascending: grouping by row keeps the samples' order
        by_row.setdefault(i // row, []).append(i % row)
    parts = [read_rows((r, r + 1)).reshape(-1)[torch.tensor(cols)] for r, cols in sorted(by_row.items())]
    return _fingerprint(shape, torch.cat(parts))


def encode_gram(key: str, value: Tensor, form: str, rank: int = 64) -> dict[str, Tensor]:
    """The stored tensors of a Gram matrix (symmetric positive semi-definite, (in, in)) in ``form``: ``"full"``,
    ``"diagonal"`` (its diagonal only), or ``"lowrank"``: the ``rank`` leading eigenpairs as a factor F = U√Λ plus the
    residual diagonal, so F Fᵀ + diag(residual) keeps the diagonal exactly (float64 eigendecomposition)."""
    value = value.detach().to(device="cpu", dtype=torch.float32)
    if form == "full" or (form == "lowrank" and rank >= value.shape[0]):  # a rank as large as the matrix: whole
        return {key: value.contiguous()}
    diag = torch.diagonal(value).clamp_min(0.0).contiguous()
    if form == "diagonal":
        return {f"{key}:diag": diag}
    evals, evecs = torch.linalg.eigh(value.double())
    top = evals[-rank:].clamp_min(0.0)
    factor = evecs[:, -rank:] * top.sqrt()
    residual = (diag.double() - factor.square().sum(1)).clamp_min(0.0)
    return {f"{key}:factor": factor.float().contiguous(), f"{key}:diag": residual.float().contiguous()}


def encode(key: str, value: Tensor, compression: str) -> dict[str, Tensor]:
    """The stored tensors of one statistic under ``compression`` (float32, bfloat16, or rank1 for 2-D tensors;
    tensors of other ranks are stored in float32 under rank1)."""
    value = value.detach().to(device="cpu", dtype=torch.float32)
    if compression == "bfloat16":
        return {key: value.to(torch.bfloat16).contiguous()}
    if compression == "rank1" and value.dim() == 2:
        return {f"{key}:row": value.sum(1).contiguous(), f"{key}:col": value.sum(0).contiguous()}
    return {key: value.contiguous()}


def write_statistics(
    path: str | os.PathLike,
    statistics: Mapping[str, Mapping[str, Tensor]],
    kinds: Mapping[str, Mapping[str, Any]],
    *,
    compression: str = "float32",
    resume: Mapping[str, Mapping[str, Tensor]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a sidecar atomically (temporary file, fsync, rename).

    Args:
        path: the sidecar file (see :func:`sidecar_path`).
        statistics: ``{kind: {parameter name: tensor}}`` in the stored convention of docs/format.md (raw
            ``exp_avg_sq``, mean g² for ``fisher.batch``...).
        kinds: per-kind metadata (β₂, steps, counts, batch size...); ``compression`` is added.
        compression: ``"float32"``, ``"bfloat16"`` or ``"rank1"`` (Adafactor row/column sums for 2-D tensors).
            Gram matrices (kind ``gram``) are stored in float32 in the form their metadata names (``form``:
            full, diagonal or lowrank with ``rank``), whatever the compression.
        resume: optional float32 accumulators ``{kind: {name: tensor}}`` stored uncompressed under
            ``resume/{kind}/{name}`` (unless ``{kind}/{name}`` already holds them in float32) so a resumed run
            continues exactly; readers of statistics ignore them.
        metadata: extra ``__metadata__`` strings (for example ``base_fingerprint``).

    Returns:
        The path written.
    """
    kinds_meta, meta = statistics_header(str(path), statistics, kinds, compression, metadata)
    tensors: dict[str, Tensor] = {}
    for kind, per_name in statistics.items():
        for name, value in per_name.items():
            if kind == GRAM:
                tensors.update(encode_gram(f"{kind}/{name}", value, kinds_meta[kind]["form"],
                                           int(kinds_meta[kind].get("rank", 64))))
            else:
                tensors.update(encode(f"{kind}/{name}", value, compression))
    for kind, per_name in (resume or {}).items():
        for name, value in per_name.items():
            stored = tensors.get(f"{kind}/{name}")
            if stored is not None and stored.dtype == torch.float32 and stored.shape == value.shape:
                continue  # already stored exactly
            tensors[f"{RESUME_PREFIX}{kind}/{name}"] = value.detach().to("cpu", torch.float32).contiguous()
    return save_tensors(path, tensors, meta, replace="own")  # a sidecar (its format marks it) replaces only a sidecar


def statistics_header(
    origin: str, statistics: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, Mapping[str, Any]],
    compression: str, metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(per-kind metadata, __metadata__ strings)`` of a sidecar holding ``statistics`` (see :func:`write_statistics`;
    the values are not read, only the kinds and names).

    Args:
        origin: the sidecar's path, for error messages.
        statistics: ``{kind: {parameter name: value}}``.
        kinds: per-kind metadata; ``compression`` (and a Gram matrix's default ``form``) are added.
        compression: the storage of the statistics.
        metadata: extra ``__metadata__`` strings.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    names: set[str] = set()
    kinds_meta: dict[str, dict[str, Any]] = {}
    for kind, per_name in statistics.items():
        if "/" in kind or kind.startswith("resume"):
            raise ValueError(f"invalid statistic kind {kind!r}")
        kinds_meta[kind] = {**dict(kinds.get(kind, {})), "compression": compression}
        if kind == GRAM:
            kinds_meta[kind].setdefault("form", "full")
            check_kind_metadata(origin, kind, kinds_meta[kind])
        names.update(per_name)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "library_version": __version__,
        "names_checksum": names_checksum(names),
        "kinds": json.dumps(kinds_meta, sort_keys=True),
        **dict(metadata or {}),
    }
    return kinds_meta, meta


def export_second_moments(
    source: str | os.PathLike | Statistics,
    out: str | os.PathLike,
    *,
    strip_prefix: str = "",
    bias_correct: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write Adam second moments as one plain safetensors file keyed by parameter name: the convention of the
    OTA reference code (``exp_avg_sq.safetensors``, given per model as ``preconditioner_path``).

    Args:
        source: a sidecar path or :class:`Statistics` holding ``exp_avg_sq``.
        out: the file to write (atomically). It must not be ``source``, nor one of ``inputs``; an existing ``out``
            must be an earlier output of lightning-merge (see docs/merging.md) and needs ``overwrite``.
        strip_prefix: removed from the start of each name (``"model."`` to key a LightningModule's capture like
            the Hugging Face model inside it); names without it are left out.
        bias_correct: write v / (1 − β₂ᵗ) instead of the raw ``exp_avg_sq`` the optimizer holds (the reference
            reads raw optimizer state, so the default is raw).
        overwrite: replace an earlier export at ``out``.
        inputs: other files the export comes from (the model whose sidecar ``source`` is), protected the same way.

    Returns:
        The path written.
    """
    from lightning_merge.files.outputs import check_output

    origin = [source] if isinstance(source, (str, os.PathLike)) else \
        ([source.origin] if os.path.exists(source.origin) else [])
    check_output(out, overwrite, inputs=[*origin, *inputs], folder=False)
    stats = source if isinstance(source, Statistics) else Statistics.load(source)
    if not stats.has("exp_avg_sq"):
        raise StatisticsError(f"{stats.origin} holds no exp_avg_sq (capture with second_moments=True and Adam/AdamW)")
    tensors = {}
    for name in stats.names("exp_avg_sq"):
        if not name.startswith(strip_prefix):
            continue
        value = stats.get(name, "exp_avg_sq") if bias_correct else stats.raw(name, "exp_avg_sq")
        tensors[name[len(strip_prefix) :]] = value.contiguous()
    if not tensors:
        raise StatisticsError(f"{stats.origin}: no exp_avg_sq name starts with {strip_prefix!r}")
    metadata = marked({"format": "exp_avg_sq", "bias_corrected": str(bias_correct).lower()})
    return save_tensors(out, tensors, metadata, replace="own" if overwrite else "never")



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
        for kind, kind_meta in self.kinds.items():
            check_kind_metadata(origin, kind, kind_meta)
        self.metadata: dict[str, str] = {}  # the file's __metadata__ (set by load)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Open a sidecar (the header is read and checked now; tensors are read on demand).

        Args:
            path: a local file, or an object-storage URL (fetched into the local cache first, see
                :mod:`lightning_merge.files.remote`).

        Raises:
            StatisticsError: the file is not a readable sidecar of a supported version, or its metadata is invalid.
        """
        if is_url(path):
            try:
                path = fetch(str(path))
            except FileNotFoundError:
                raise StatisticsError(f"statistics file '{path}' does not exist") from None
        path = Path(path)
        try:
            file = SafetensorsFile(path)
        except SafetensorsError as err:
            raise StatisticsError(f"statistics file '{path}' {err.reason}; delete it and capture again") from None
        except FileNotFoundError:
            raise StatisticsError(f"statistics file '{path}' does not exist") from None
        meta = file.metadata
        if meta.get("format") != FORMAT:
            raise StatisticsError(f"'{path}' is not a lightning-merge statistics file (format={meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", 0))
        except ValueError:
            raise StatisticsError(f"'{path}': format_version {meta.get('format_version')!r} is not a number") from None
        if version > FORMAT_VERSION:
            raise StatisticsError(
                f"'{path}' uses statistics format version {version}; this lightning-merge reads up to "
                f"{FORMAT_VERSION}: upgrade lightning-merge"
            )
        try:
            kinds = json.loads(meta.get("kinds", "{}"))
        except json.JSONDecodeError as err:
            raise StatisticsError(f"'{path}': metadata 'kinds' is not valid JSON ({err})") from err
        if not isinstance(kinds, dict) or not all(isinstance(v, dict) for v in kinds.values()):
            raise StatisticsError(f"'{path}': metadata 'kinds' must map each kind to an object")
        stats = cls(TensorFileMapping(file), kinds, str(path))
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

    def renamed(self, names: Mapping[str, str], origin: str | None = None) -> Statistics:
        """These statistics under other tensor names (``{name: new name}``; names not in it are left out, and so are
        the resume accumulators), with the per-name metadata (β₂, steps, counts) renamed alike: a LightningModule's
        statistics keyed like a PEFT adapter's weights, for example. The tensors are not copied."""
        tensors: dict[str, Any] = {}
        for key in self._tensors.keys():
            if key.startswith(RESUME_PREFIX) or "/" not in key:
                continue
            kind, rest = key.split("/", 1)
            name = _strip_part(rest)
            if name in names:
                tensors[f"{kind}/{names[name]}{rest[len(name):]}"] = self._tensors[key]
        kinds = {}
        for kind, meta in self.kinds.items():
            meta = dict(meta)
            for field in ("beta2", "step", "count"):
                if isinstance(meta.get(field), dict):
                    meta[field] = {names[n]: v for n, v in meta[field].items() if n in names}
            kinds[kind] = meta
        out = Statistics(tensors, kinds, origin or self.origin)
        out.metadata = dict(self.metadata)
        return out

    # -- queries ------------------------------------------------------------------------------------------------
    def _resolve_kind(self, kind: str, estimator: str | None) -> str:
        if kind == RAW_SECOND_MOMENTS:
            kind = "exp_avg_sq"
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
        raise MissingStatistic(
            f"{self.origin} has no statistic {kind!r}; it holds {', '.join(sorted(self.kinds)) or 'no statistics'}"
        )

    def resolve_kind(self, kind: str, estimator: str | None = None) -> str:
        """The stored kind a request reads (``"fisher"`` → ``"fisher.true"``, ``"fisher.example"`` or
        ``"fisher.batch"``, in that order of preference)."""
        return self._resolve_kind(kind, estimator)

    def all_names(self) -> set[str]:
        """Every parameter name with a statistic of any kind (resume accumulators excluded)."""
        out = set()
        for key in self._tensors.keys():
            if key.startswith(RESUME_PREFIX) or "/" not in key:
                continue
            out.add(_strip_part(key.split("/", 1)[1]))
        return out

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
        out: dict[str, None] = {}
        for key in self._tensors.keys():
            if key.startswith(prefix):
                out[_strip_part(key[len(prefix) :])] = None
        return list(out)

    def raw(self, name: str, kind: str, estimator: str | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        """The stored tensor in float32 (rank-1 halves reconstructed), before any correction; ``rows=(start, stop)``:
        those rows only (read from a sidecar file's bytes alone; not for a Gram matrix)."""
        stored = self._resolve_kind(kind, estimator)
        key = f"{stored}/{name}"
        if key in self._tensors:
            if rows is None:
                return self._tensors[key].to(torch.float32)
            file = getattr(self._tensors, "file", None)
            if file is not None:
                return file.get(key, rows).to(torch.float32)
            return self._tensors[key][rows[0]:rows[1]].to(torch.float32)
        if f"{key}:row" in self._tensors:
            return rank1_reconstruct(self._tensors[f"{key}:row"], self._tensors[f"{key}:col"], rows)
        if f"{key}:diag" in self._tensors:  # a Gram matrix stored as its diagonal, or low rank + residual diagonal
            value = torch.diag(self._tensors[f"{key}:diag"].to(torch.float32))
            if f"{key}:factor" in self._tensors:
                factor = self._tensors[f"{key}:factor"].to(torch.float32)
                value = value.addmm_(factor, factor.T)
            return value
        raise MissingStatistic(f"{self.origin} has no {stored!r} statistic for tensor '{name}'")

    def get(self, name: str, kind: str, estimator: str | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        """The merge-ready float32 statistic of tensor ``name``.

        ``exp_avg_sq`` is bias-corrected with the β₂ and the per-parameter step recorded at capture (the request
        ``"exp_avg_sq.raw"``, :data:`RAW_SECOND_MOMENTS`, returns it uncorrected, checked like the others); the
        batch-empirical Fisher is multiplied by the global effective batch size; a Gram matrix is divided by its
        count of input rows (the mean xxᵀ, FusionBench's RegMean convention); other kinds are returned as stored.
        See docs/format.md and ALGORITHMS.md. ``rows=(start, stop)``: those rows only, for an elementwise kind (the
        corrections are per tensor scalars, so the rows of the whole).
        """
        stored = self._resolve_kind(kind, estimator)
        if rows is not None and stored == GRAM:
            raise ValueError(f"{self.origin}: the Gram matrix of tensor '{name}' has no rows of the tensor")
        value = self.raw(name, kind, estimator, rows)
        meta = self.kinds.get(stored, {})
        if stored == GRAM:
            _check_gram(self.origin, name, value)
            if meta.get("ready"):
                return value
            count = _per_name(meta, "count", name, self.origin)
            if count <= 0:
                raise StatisticsError(f"{self.origin}: the Gram matrix of tensor '{name}' was accumulated over no "
                                      "input rows; capture it over some data")
            return value / count
        _check_values(self.origin, stored, name, value)
        if meta.get("ready"):
            return value
        if stored == "exp_avg_sq":  # the raw request is checked alike: a capture before any update holds no curvature
            beta2 = _per_name(meta, "beta2", name, self.origin)
            step = _per_name(meta, "step", name, self.origin)
            if step <= 0:
                raise StatisticsError(
                    f"{self.origin}: tensor '{name}' has exp_avg_sq recorded at optimizer step {step:g}, before any "
                    "update, so it holds no curvature and cannot be bias-corrected; capture after at least one "
                    "optimizer step"
                )
            return value if kind == RAW_SECOND_MOMENTS else value / (1.0 - beta2**step)
        if stored == "fisher.batch":
            decay = meta.get("ema_decay")
            if decay:  # an exponential moving average: bias-corrected like Adam's second moments
                count = _per_name(meta, "count", name, self.origin)
                value = value / (1.0 - float(decay) ** count)
            # ``scale`` (this version): values already weighted per step by N²/B; older sidecars: × the mean batch
            return value * float(meta.get("scale", meta.get("batch_size", 1)))
        return value


def _check_values(origin: str, kind: str, name: str, value: Tensor) -> None:
    """A statistic is a variance-like quantity: every entry finite and non-negative."""
    if all_non_negative_finite(value):
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise StatisticsError(
            f"{origin}: the {kind!r} statistic of tensor '{name}' has {bad} NaN or infinite entries; the capture "
            "diverged (non-finite gradients or optimizer state): capture again, or leave this expert out"
        )
    if bool((value < 0).any()):
        bad = int((value < 0).sum())
        raise StatisticsError(
            f"{origin}: the {kind!r} statistic of tensor '{name}' has {bad} negative entries; Fisher and second "
            "moments are non-negative, so the file is corrupted or was written by something else"
        )


def _strip_part(name: str) -> str:
    """A parameter name without the suffix of a stored part (``:row``, ``:col``, ``:diag``, ``:factor``)."""
    for suffix in _PART_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_gram(origin: str, name: str, value: Tensor) -> None:
    """A Gram matrix Σ xxᵀ: square, finite, symmetric, with a non-negative diagonal."""
    if value.dim() != 2 or value.shape[0] != value.shape[1]:
        raise StatisticsError(f"{origin}: the Gram matrix of tensor '{name}' has shape {list(value.shape)}, not "
                              "square; the file is corrupted or was written by something else")
    if not bool(torch.isfinite(value).all()):
        raise StatisticsError(f"{origin}: the Gram matrix of tensor '{name}' has NaN or infinite entries; the "
                              "capture saw non-finite activations: capture again, or leave this expert out")
    if not value.numel():
        return
    scale = float(torch.diagonal(value).abs().max())
    if bool((torch.diagonal(value) < 0).any()) or float((value - value.T).abs().amax()) > 1e-3 * scale:
        raise StatisticsError(f"{origin}: the Gram matrix of tensor '{name}' is not symmetric with a non-negative "
                              "diagonal, so it is no Gram matrix: the file is corrupted or was written by something "
                              "else")


def _in_range(origin: str, kind: str, key: str, value: Any, *, low: float, high: float | None = None,
              open_low: bool = True, open_high: bool = True) -> None:
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if open_low else v >= low)
        if high is not None:
            ok = ok and (v < high if open_high else v <= high)
        if not ok:
            lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
            bound = f"{lo}{low}, {'inf' if high is None else high}{hi}"
            raise StatisticsError(f"{origin}: metadata {kind}.{key} = {brief(v)} is not in {bound}; the sidecar is "
                                  "invalid")


def check_kind_metadata(origin: str, kind: str, meta: Mapping[str, Any]) -> None:
    """Refuse metadata that would silently give wrong statistics (β₂ = 1 divides by zero, a negative batch size
    drops the expert, a step of 0 is no optimizer step)."""
    if kind == "exp_avg_sq":
        if "beta2" in meta:
            _in_range(origin, kind, "beta2", meta["beta2"], low=0.0, high=1.0)
    if kind == GRAM:
        if meta.get("form", "full") not in GRAM_FORMS:
            raise StatisticsError(f"{origin}: metadata gram.form = {brief(meta.get('form'))} is not one of "
                                  f"{', '.join(GRAM_FORMS)}; the sidecar is invalid")
        if meta.get("count") is not None:
            _in_range(origin, kind, "count", meta["count"], low=0.0)
        if meta.get("rank") is not None:
            _in_range(origin, kind, "rank", meta["rank"], low=1.0, open_low=False)
    if kind.startswith("fisher"):
        if meta.get("batch_size") is not None:
            _in_range(origin, kind, "batch_size", meta["batch_size"], low=0.0)
        if meta.get("scale") is not None:
            _in_range(origin, kind, "scale", meta["scale"], low=0.0)
        if meta.get("ema_decay") is not None:
            _in_range(origin, kind, "ema_decay", meta["ema_decay"], low=0.0, high=1.0)
        if meta.get("count") is not None:
            _in_range(origin, kind, "count", meta["count"], low=0.0)


def _per_name(meta: Mapping[str, Any], key: str, name: str, origin: str) -> float:
    value = meta.get(key)
    if isinstance(value, Mapping):
        if name not in value:
            raise StatisticsError(f"{origin}: metadata '{key}' has no entry for tensor '{name}'")
        return float(value[name])
    if value is None:
        raise StatisticsError(f"{origin}: metadata '{key}' is missing; the sidecar is incomplete")
    return float(value)
