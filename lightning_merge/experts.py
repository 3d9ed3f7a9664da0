"""Experts: lazy, read-only sources of named tensors (and their captured statistics)."""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.stats import SIDECAR_NAME, Statistics, StatisticsError, find_sidecar

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and storage dtype of one tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


class _DictSource:
    def __init__(self, tensors: Mapping[str, Tensor]):
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self._tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach()


class SafetensorsFile:
    """A safetensors file read with ``pread`` into private memory, one tensor at a time.

    Only the header is read up front. Tensors are read on request into freshly allocated buffers, so the process
    holds only the tensors in use (a memory map would count every page it ever touched toward resident memory,
    up to the whole file). Reads are thread-safe (``pread`` at explicit offsets).
    """

    MAX_HEADER = 100 << 20

    def __init__(self, path: Path):
        self._fd = -1
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"safetensors file '{path}' is truncated (no header)")
            n = struct.unpack("<Q", raw)[0]
            if n > self.MAX_HEADER or 8 + n > size:
                raise ValueError(f"safetensors file '{path}' is truncated or corrupted (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"safetensors file '{path}' has a corrupted header ({err})") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[TensorSpec, int, int]] = {}
        for key, info in header.items():
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"'{path}': tensor '{key}' has unsupported dtype {info.get('dtype')}")
            start, end = info["data_offsets"]
            spec = TensorSpec(tuple(info["shape"]), dtype)
            if end - start != spec.nbytes or self.data_start + end > size:
                raise ValueError(
                    f"safetensors file '{path}' is truncated or corrupted: tensor '{key}' does not fit "
                    f"({end - start} bytes at {start}, file of {size} bytes)"
                )
            self.entries[key] = (spec, start, end)
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][1])

    def spec(self, key: str) -> TensorSpec:
        return self.entries[key][0]

    def get(self, key: str) -> Tensor:
        spec, start, end = self.entries[key]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        offset, pos = self.data_start + start, 0
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise ValueError(f"safetensors file '{self.path}' ended early while reading '{key}'")
            pos += got
        if spec.dtype == torch.bool:
            return buffer.view(torch.bool).reshape(spec.shape)
        return buffer.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class _SafetensorsSource:
    """One or more safetensors files (a sharded folder); headers only are read up front."""

    def __init__(self, files: list[Path]):
        self._files: dict[str, SafetensorsFile] = {}
        self._order: list[str] = []
        for file in files:
            handle = SafetensorsFile(file)
            for key in handle.keys():
                self._files[key] = handle
                self._order.append(key)

    def keys(self) -> list[str]:
        return list(self._order)

    def spec(self, key: str) -> TensorSpec:
        return self._files[key].spec(key)

    def get(self, key: str) -> Tensor:
        return self._files[key].get(key)


def load_torch_file(path: Path, trust_checkpoint: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped where possible), with a clear error and an
    explicit opt-in when the file holds custom objects."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust_checkpoint}
    try:
        return torch.load(path, mmap=True, **kwargs)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, **kwargs)
    except Exception as err:
        if trust_checkpoint or "weights_only" not in str(err).lower().replace(" ", "_").replace("-", "_"):
            raise
        match = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"global ([\w.]+)", str(err))
        what = match.group(1) if match else "a custom Python object"
        raise ValueError(
            f"'{path}' holds {what} (typically in hyper_parameters from save_hyperparameters()), which a safe "
            f"load refuses. If you trust this file, pass trust_checkpoint=True (CLI: --trust-checkpoint): that "
            f"unpickles it and can run arbitrary code."
        ) from err


class _TorchSource(_DictSource):
    def __init__(self, path: Path, trust_checkpoint: bool):
        obj = load_torch_file(path, trust_checkpoint)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint")
        super().__init__(obj)


def _folder_files(folder: Path) -> tuple[str, list[Path]]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"'{index}' is not a valid shard index ({err})") from err
            files = sorted({folder / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ValueError(f"'{index}' lists shard files that are missing: {', '.join(missing)}")
            return ("safetensors" if index_name.startswith("model.safetensors") else "torch"), files
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != SIDECAR_NAME)
    if files:
        return "safetensors", files
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
        if (folder / name).exists():
            return "torch", [folder / name]
    raise ValueError(
        f"folder '{folder}' holds no model weights (no model.safetensors[.index.json], *.safetensors or "
        f"pytorch_model.bin)"
    )


class Expert:
    """A lazy, read-only source of named tensors, plus the statistics captured for it.

    Args:
        source: a ``.ckpt`` Lightning checkpoint (its ``state_dict``), a ``.safetensors`` file, a ``.bin`` /
            ``.pt`` state dict, a Hugging Face style folder (sharded safetensors with an index), an in-memory
            state dict, or an ``nn.Module``.
        prefix: keep only tensors whose name starts with this prefix, and strip it (``"model."`` for a
            LightningModule that holds its network as ``self.model``). Applies to statistic names too.
        statistics: a sidecar path or an in-memory mapping that overrides the sidecar found next to ``source``
            (``X.statistics.safetensors`` next to a file, ``statistics.safetensors`` inside a folder).
        name: a display name for messages and the merge journal (default: the file name).
        trust_checkpoint: allow unpickling arbitrary objects from a ``.ckpt`` (only for files you trust).
        base: for a PEFT LoRA adapter folder, the base model it adapts (a path or an ``Expert``); default the
            adapter config's ``base_model_name_or_path`` when that is a local path. The expert then reads like a
            full model: θ₀ + ΔW on the adapted tensors (ΔW = s·B A, computed per tensor on demand), θ₀ elsewhere;
            its statistics are ΔW-space precisions from the adapter's statistics (delta method).

    Example::

        expert = Expert("runs/code/last.ckpt", prefix="model.")
        expert.names()[:3], expert.spec("layers.0.weight"), expert.tensor("layers.0.weight")
    """

    def __init__(
        self,
        source: str | os.PathLike | Mapping[str, Tensor] | nn.Module,
        *,
        prefix: str | None = None,
        statistics: str | os.PathLike | Mapping[str, Any] | Statistics | None = None,
        name: str | None = None,
        trust_checkpoint: bool = False,
        base: str | os.PathLike | Expert | None = None,
    ) -> None:
        self.path: Path | None = None
        self.prefix = prefix or ""
        self.lora = None
        if isinstance(source, nn.Module):
            self._source: Any = _DictSource(source.state_dict())
            default_name = type(source).__name__
        elif isinstance(source, Mapping):
            self._source = _DictSource(source)
            default_name = "<state dict>"
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.path = path
            default_name = path.name
            if not path.exists():
                raise FileNotFoundError(f"expert '{path}' does not exist")
            if path.is_dir() and (path / "adapter_config.json").exists():
                self._source = self._open_adapter(path, base, trust_checkpoint)
            elif path.is_dir():
                kind, files = _folder_files(path)
                if kind == "safetensors":
                    self._source = _SafetensorsSource(files)
                else:
                    self._source = _merged_torch(files, trust_checkpoint)
            elif path.suffix == ".safetensors":
                self._source = _SafetensorsSource([path])
            else:
                self._source = _TorchSource(path, trust_checkpoint)
        else:
            raise TypeError(f"Expert source must be a path, a state dict or an nn.Module, got {type(source).__name__}")
        self.name = name or default_name

        keys = self._source.keys()
        if self.prefix:
            self._keys = {k[len(self.prefix) :]: k for k in keys if k.startswith(self.prefix)}
            if not self._keys:
                sample = ", ".join(keys[:5])
                raise ValueError(
                    f"expert '{self.name}' has no tensor under prefix {self.prefix!r} (it has: {sample} ...)"
                )
        else:
            self._keys = {k: k for k in keys}

        self._statistics: Statistics | None = None
        if statistics is not None:
            if isinstance(statistics, (str, os.PathLike)):
                self._statistics = Statistics.load(statistics)
            else:
                self._statistics = Statistics.from_mapping(statistics, origin=f"statistics of expert '{self.name}'")
        elif self.path is not None:
            sidecar = find_sidecar(self.path)
            if sidecar is not None:
                self._statistics = Statistics.load(sidecar)

        # A sidecar keyed like the checkpoint carries the prefix; an in-memory one may already be stripped.
        self._stats_prefix = ""
        if self.prefix and self._statistics is not None:
            first = itertools.islice(self._statistics.keys(), 8)
            if any(f"/{self.prefix}" in key for key in first):
                self._stats_prefix = self.prefix
        if self._statistics is not None and isinstance(statistics, (str, os.PathLike, type(None))) and not self.lora:
            self._check_statistics_names()

    def _open_adapter(self, path: Path, base: Any, trust_checkpoint: bool) -> Any:
        from lightning_merge.lora import LoraAdapter, LoraSource

        if base is None:
            config = json.loads((path / "adapter_config.json").read_text())
            guess = config.get("base_model_name_or_path")
            if not guess or not Path(guess).exists():
                raise ValueError(
                    f"'{path}' is a LoRA adapter: pass base= the model it adapts (its config names {guess!r}, which is "
                    "not a local path)"
                )
            base = guess
        base_expert = base if isinstance(base, Expert) else Expert(base, trust_checkpoint=trust_checkpoint)
        self.lora = LoraAdapter(path, base_expert.names())
        return LoraSource(self.lora, base_expert)

    def _check_statistics_names(self) -> None:
        """A sidecar must describe tensors of this expert: refuse one written for another checkpoint."""
        assert self._statistics is not None
        known = set(self._keys.values())
        stat_names = self._statistics.all_names()
        if self._stats_prefix:
            stat_names = {n for n in stat_names if n.startswith(self._stats_prefix)}
        else:
            known = set(self._keys)
        unknown = sorted(n for n in stat_names if n not in known)
        if unknown:
            sample = ", ".join(unknown[:3])
            raise StatisticsError(
                f"statistics '{self._statistics.origin}' do not match expert '{self.name}': {len(unknown)} of its "
                f"{len(stat_names)} statistics are for tensors the expert does not have ({sample}"
                f"{' ...' if len(unknown) > 3 else ''}); the sidecar belongs to another checkpoint, or the parameter "
                f"names changed. Capture again, or pass statistics= the right file"
            )

    def __repr__(self) -> str:
        return f"Expert({self.name!r}, tensors={len(self._keys)})"

    # -- tensors --------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names (prefix stripped), in storage order."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def subset(self, names: list[str] | set[str]) -> Expert:
        """A view of this expert restricted to ``names`` (nothing is read; statistics are shared)."""
        import copy

        view = copy.copy(self)
        view._keys = {n: k for n, k in self._keys.items() if n in set(names)}
        return view

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of tensor ``name``; reads no data."""
        return self._source.spec(self._key(name))

    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` in its storage dtype (memory-mapped for safetensors)."""
        return self._source.get(self._key(name))

    def _key(self, name: str) -> str:
        try:
            return self._keys[name]
        except KeyError:
            raise KeyError(f"expert '{self.name}' has no tensor '{name}'") from None

    # -- statistics -----------------------------------------------------------------------------------------------
    @property
    def statistics(self) -> Statistics | None:
        """The attached statistics, or None."""
        return self._statistics

    @property
    def metadata(self) -> dict[str, Any]:
        """What the capture recorded, per statistic kind (empty without statistics)."""
        return dict(self._statistics.kinds) if self._statistics else {}

    def has_statistic(self, kind: str) -> bool:
        """Whether a statistic of ``kind`` (``"fisher"``, ``"exp_avg_sq"``) is attached."""
        return self._statistics is not None and self._statistics.has(kind)

    def statistic(self, name: str, kind: str, estimator: str | None = None) -> Tensor:
        """The merge-ready float32 statistic of tensor ``name`` (see :meth:`Statistics.get`).

        Raises:
            StatisticsError: no statistics attached, or none of that kind for this tensor.
        """
        if self._statistics is None:
            raise StatisticsError(
                f"expert '{self.name}' has no statistics (no sidecar next to it and none passed as statistics=)"
            )
        if self.lora is not None:
            if name in self.lora.modules:
                return self.lora.precision(name, self._statistics, kind, estimator)
            # The adapter does not change this tensor (ΔW = 0): it carries no curvature there.
            return torch.zeros(self.spec(name).shape, dtype=torch.float32)
        return self._statistics.get(self._stats_prefix + name, kind, estimator)


def _merged_torch(files: list[Path], trust_checkpoint: bool) -> _DictSource:
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(_TorchSource(file, trust_checkpoint)._tensors)
    return _DictSource(tensors)


def as_expert(obj: Any, what: str = "expert") -> Expert:
    """Return ``obj`` if it is an :class:`Expert`, else open it as one."""
    if isinstance(obj, Expert):
        return obj
    try:
        return Expert(obj)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} '{obj}' does not exist") from None
