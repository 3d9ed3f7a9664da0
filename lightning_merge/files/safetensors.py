"""The one safetensors reader and writer of the package (experts, sidecars, continual states, TALL folders, adapters).

Reading: :class:`SafetensorsFile` validates the whole header when it opens a file (types, shapes, offsets inside
the file, no two tensors sharing bytes) and reads tensors with ``pread`` into private buffers, one at a time, so a
process holds only the tensors in use (a memory map would count every touched page toward resident memory).

Writing: :class:`ShardWriter` computes the header from the planned shapes first and writes each tensor at its
offset as it arrives, so no file is ever assembled in memory; :func:`save_tensors` writes a whole mapping
atomically with it (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.errors import DuplicateKeyError, SafetensorsError
from lightning_merge.files.atomic import special_file_kind
from lightning_merge.files.remote import is_url, output_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 << 20



@dataclass(frozen=True)
class TensorSpec:
    """Shape and storage dtype of one tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def _entry_spec(path: Path, key: str, info: Any) -> tuple[TensorSpec, int, int]:
    where = f"is truncated or corrupted: tensor '{key}'"
    if not isinstance(info, Mapping):
        raise SafetensorsError(path, f"{where} is described by a {type(info).__name__}, not an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise SafetensorsError(path, f"has tensor '{key}' of unsupported dtype {info.get('dtype')!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsError(path, f"{where} has shape {shape!r}, not a list of non-negative integers")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsError(path, f"{where} has data_offsets {offsets!r}, not two integers")
    start, end = offsets
    if start < 0 or end < start:
        raise SafetensorsError(path, f"{where} has data_offsets [{start}, {end}], which do not form a byte range")
    spec = TensorSpec(tuple(shape), dtype)
    if end - start != spec.nbytes:
        raise SafetensorsError(path, f"{where} declares shape {shape} of {spec.nbytes} bytes but occupies "
                                     f"{end - start} bytes")
    return spec, start, end



def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` for files that name tensors (a safetensors header, a shard index): a key
    given twice is an error, not the last value silently kept.

    Raises:
        DuplicateKeyError: naming the key.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[TensorSpec, int, int]], int]:
    """Read and validate a safetensors header: ``(metadata, {name: (spec, start, end)}, data_start)``.

    Raises:
        SafetensorsError: the file is truncated, the header is not a JSON object of well-formed entries, an entry's
            bytes lie outside the file, or two entries share bytes.
    """
    special = special_file_kind(path)
    if special is not None:
        raise SafetensorsError(path, f"is {special}, not a regular file: reading it could wait forever; give the "
                                     "file itself")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(path, f"is truncated or corrupted: {size} bytes, no header")
            n = struct.unpack("<Q", raw)[0]
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    path, f"is truncated or corrupted: a header of {n} bytes in a file of {size} (or not safetensors)"
                )
            text = f.read(n)
    except OSError as err:
        raise SafetensorsError(path, f"cannot be read: {err.strerror or err}") from None
    try:
        header = json.loads(text, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SafetensorsError(path, f"is truncated or corrupted: its header is not JSON ({err})") from None
    except DuplicateKeyError as err:
        raise SafetensorsError(
            path, f"is corrupted or crafted: its header names {err.args[0]!r} twice (which one holds the data cannot "
                  "be known; a JSON reader would silently keep the last)"
        ) from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise SafetensorsError(path, f"is truncated or corrupted: its header is a {kind}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(path, "is corrupted: its __metadata__ is not an object of strings")
    data_start = 8 + n
    entries = {key: _entry_spec(path, key, info) for key, info in header.items()}
    spans = sorted((start, end, key) for key, (_, start, end) in entries.items() if end > start)
    for (_, prev_end, prev_key), (start, _, key) in zip(spans, spans[1:]):
        if start < prev_end:
            raise SafetensorsError(
                path, f"is corrupted or crafted: tensors '{prev_key}' and '{key}' share bytes (overlapping offsets)"
            )
    for key, (_, _start, end) in entries.items():
        if data_start + end > size:
            raise SafetensorsError(
                path, f"is truncated or corrupted: tensor '{key}' ends at byte {data_start + end} of a file of {size}"
            )
    return metadata, entries, data_start


class SafetensorsFile:
    """A safetensors file read with ``pread`` into private memory, one tensor at a time (thread-safe).

    Args:
        path: the file. The header is read and validated at once (see :func:`read_header`); data on request.
    """

    def __init__(self, path: str | os.PathLike):
        self._fd = -1
        self.path = Path(path)
        self.metadata, self.entries, self.data_start = read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        """Tensor names in storage order."""
        return sorted(self.entries, key=lambda k: self.entries[k][1])

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def spec(self, key: str) -> TensorSpec:
        return self.entries[key][0]

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``key`` in its storage dtype (a fresh buffer).

        Args:
            key: the tensor's name.
            rows: ``(start, stop)``: only those rows (indices along the first axis), read from their bytes alone;
                None reads the whole tensor.
        """
        spec, start, end = self.entries[key]
        shape = spec.shape
        if rows is not None:
            first, last = _row_range(key, shape, rows)
            row_bytes = (end - start) // shape[0] if shape[0] else 0
            start, end = start + first * row_bytes, start + last * row_bytes
            shape = (last - first, *shape[1:])
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        offset, pos = self.data_start + start, 0
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise SafetensorsError(self.path, f"ended early while reading '{key}' (truncated since it was opened)")
            pos += got
        return buffer.view(spec.dtype).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _row_range(key: str, shape: tuple[int, ...], rows: tuple[int, int]) -> tuple[int, int]:
    """``rows`` checked against tensor ``key``'s first axis."""
    first, last = rows
    if not shape or not 0 <= first <= last <= shape[0]:
        raise ValueError(f"rows {first}:{last} are not within tensor '{key}' of shape {list(shape)}")
    return first, last


class TensorFileMapping(Mapping):
    """A read-only mapping ``name -> tensor`` over a :class:`SafetensorsFile` (tensors read on access)."""

    def __init__(self, file: SafetensorsFile):
        self.file = file
        self._keys = file.keys()

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.file.entries:
            raise KeyError(key)
        return self.file.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.file.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# -- writing ---------------------------------------------------------------------------------------------------


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


EARLY_WRITEBACK_BYTES = 1 << 20  # tensors at least this large start their disk write as soon as they are written


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to begin writing a range back to disk without waiting (Linux: ``POSIX_FADV_DONTNEED`` starts
    writeback of dirty pages, then drops the clean ones from the page cache). A no-op where unsupported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class ShardWriter:
    """A safetensors file whose header is known up front: tensors are written at their offsets as they come.

    Args:
        path: the file to create (truncated if it exists).
        entries: ``(name, spec)`` of every tensor, in storage order.
        metadata: the ``__metadata__`` strings.
        early_writeback: start writing large tensors to disk as soon as they are written (see
            :data:`EARLY_WRITEBACK_BYTES`), so the final fsync overlaps the work before it.
        create: create the file and write its header; False opens a file another process created from the same
            entries (a distributed merge: each rank writes its tensors at their offsets).
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, TensorSpec]], metadata: Mapping[str, str],
                 early_writeback: bool = True, create: bool = True):
        self.path = path
        self.early_writeback = early_writeback
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, tuple[int, int, TensorSpec]] = {}
        offset = 0
        for name, spec in entries:
            if spec.dtype not in TORCH_TO_SAFETENSORS:
                stored = ", ".join(str(d).replace("torch.", "") for d in TORCH_TO_SAFETENSORS)
                raise ValueError(f"tensor '{name}' has dtype {str(spec.dtype).replace('torch.', '')}, which a "
                                 f"safetensors file cannot hold (it holds {stored}): convert it, or write a .ckpt")
            size = spec.nbytes
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + size],
            }
            self.offsets[name] = (offset, size, spec)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        if not create:
            self.fd = os.open(path, os.O_RDWR)
            return
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.total)
        _pwrite_all(self.fd, struct.pack("<Q", len(raw)) + raw, 0)

    def write(self, name: str, tensor: Tensor) -> None:
        """Write tensor ``name`` (its dtype and shape must be the planned ones)."""
        offset, size, spec = self.offsets[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        _pwrite_all(self.fd, memoryview(data.view(torch.uint8).numpy()), self.data_start + offset)
        if self.early_writeback and size >= EARLY_WRITEBACK_BYTES:
            # Start the disk write of this range now (asynchronously, in the kernel) so that the final fsync
            # finds little left to do: writing overlaps the next tensors' reads and compute. Durability is
            # unchanged: close(sync=True) still fsyncs the whole file.
            _start_writeback(self.fd, self.data_start + offset, size)

    def write_rows(self, name: str, start: int, rows: Tensor) -> None:
        """Write rows ``start ..`` of tensor ``name`` (a slice along its first axis, of the planned dtype): a tensor
        written in row chunks is never whole in memory."""
        offset, size, spec = self.offsets[name]
        if rows.dtype != spec.dtype or tuple(rows.shape[1:]) != spec.shape[1:] or not spec.shape or \
                start < 0 or start + rows.shape[0] > spec.shape[0]:
            raise RuntimeError(
                f"rows {start}:{start + (rows.shape[0] if rows.dim() else 0)} of tensor '{name}' are "
                f"{tuple(rows.shape)} {rows.dtype}, planned {spec.shape} {spec.dtype}"
            )
        data = rows.detach().to("cpu").contiguous().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        row_bytes = size // spec.shape[0] if spec.shape[0] else 0
        at = self.data_start + offset + start * row_bytes
        _pwrite_all(self.fd, memoryview(data.view(torch.uint8).numpy()), at)
        if self.early_writeback and data.numel() * data.element_size() >= EARLY_WRITEBACK_BYTES:
            _start_writeback(self.fd, at, data.numel() * data.element_size())

    def close(self, sync: bool) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def specs_of(tensors: Mapping[str, Tensor]) -> list[tuple[str, TensorSpec]]:
    """``(name, spec)`` of each tensor; a sparse or quantized tensor, or a value that is no tensor, is refused by name
    (safetensors holds dense tensors)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"'{name}' is a {type(t).__name__}, not a tensor: safetensors files hold tensors only")
        if t.layout != torch.strided or t.is_quantized:
            what = "quantized" if t.is_quantized else str(t.layout).replace("torch.", "")
            raise ValueError(f"tensor '{name}' is a {what} tensor: safetensors files hold dense tensors; save it with "
                             ".to_dense() (or .dequantize())")
    return [(name, TensorSpec(tuple(t.shape), t.dtype)) for name, t in tensors.items()]


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], metadata: Mapping[str, str]
    | None = None, *, replace: str = "always"
) -> Path:
    """Write ``tensors`` as one safetensors file, atomically (temporary name, fsync, rename; or, for an
    object-storage URL, one upload of the finished file).

    Tensors that share storage (tied weights) are written as independent copies, as safetensors requires.

    Args:
        path: the file (or URL).
        tensors: the tensors, in order.
        metadata: the header's ``__metadata__`` strings.
        replace: what may be at ``path``: ``"always"`` (anything), ``"own"`` (an earlier output of lightning-merge:
            the tool's outputs pass this, with the ``lightning_merge`` mark in ``metadata``), ``"never"`` (nothing;
            see :func:`lightning_merge.files.atomic.commit`).
    """
    items = dict(tensors)
    if not is_url(path):
        path = Path(path)
    with output_file(path, replace=replace) as tmp:
        writer = ShardWriter(tmp, specs_of(items), metadata or {})
        try:
            for name, tensor in items.items():
                writer.write(name, tensor)
        finally:
            writer.close(sync=False)  # atomic_file fsyncs the file before the rename
    return path  # type: ignore[return-value]


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, validated (see :class:`SafetensorsFile`)."""
    with SafetensorsFile(path) as file:
        return {key: file.get(key) for key in file.keys()}


__all__ = [
    "DuplicateKeyError",
    "SAFETENSORS_DTYPES",
    "SafetensorsError",
    "SafetensorsFile",
    "ShardWriter",
    "TensorFileMapping",
    "TensorSpec",
    "load_tensors",
    "read_header",
    "save_tensors",
    "unique_keys",
]
