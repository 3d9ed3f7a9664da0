"""Experts: lazy, read-only sources of named tensors (and their captured statistics)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.files.atomic import special_file_kind
from lightning_merge.files.finite import all_finite, cast_checked, count_non_finite
from lightning_merge.files.ownership import INCOMPLETE_NAME, incomplete
from lightning_merge.files.remote import is_url, redact
from lightning_merge.files.safetensors import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    DuplicateKeyError,
    SafetensorsError,
    SafetensorsFile,
    TensorSpec,
    unique_keys,
)
from lightning_merge.files.torch_load import CheckpointError, load_torch_file
from lightning_merge.formats.lora import LoraAdapter, LoraSource, adapter_base_path
from lightning_merge.formats.sidecar import (
    GRAM,
    SIDECAR_NAME,
    SIDECAR_SUFFIX,
    MissingStatistic,
    Statistics,
    StatisticsError,
    fetch_with_sidecar,
    find_sidecar,
    fingerprint_rows,
    sidecar_path,
    tensor_fingerprint,
)
from lightning_merge.sources.distcp import DistcpSource, DistributedCheckpoint, is_distributed_checkpoint

log = logging.getLogger("lightning_merge")


class _DictSource:
    def __init__(self, tensors: Mapping[str, Tensor], origin: str = "the state dict"):
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, Tensor)}
        for key, tensor in self._tensors.items():
            _check_readable(origin, key, tensor)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self._tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach()


class _SafetensorsSource:
    """One or more safetensors files (a sharded folder); headers only are read up front. A tensor name found in two
    files is an error naming both (which one is meant cannot be known)."""

    reads_rows = True  # get(key, rows) reads only those rows' bytes

    def __init__(self, files: list[Path]):
        self._files: dict[str, SafetensorsFile] = {}
        self._order: list[str] = []
        for file in files:
            handle = SafetensorsFile(file)
            for key in handle.keys():
                if key in self._files:
                    raise ValueError(
                        f"tensor '{key}' is in both '{self._files[key].path}' and '{file}': the folder holds two "
                        "models or a stray shard; remove the extra file, or give the file of the model to merge"
                    )
                self._files[key] = handle
                self._order.append(key)

    def keys(self) -> list[str]:
        return list(self._order)

    def file_of(self, key: str) -> Path | None:
        """The shard that holds tensor ``key`` (None: none does)."""
        handle = self._files.get(key)
        return handle.path if handle is not None else None

    def spec(self, key: str) -> TensorSpec:
        return self._files[key].spec(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        return self._files[key].get(key, rows)


class _TorchSource(_DictSource):
    def __init__(self, path: Path, trust_checkpoint: bool, prefix: str = ""):
        super().__init__(_weights_of(path, load_torch_file(path, trust_checkpoint), prefix), origin=f"'{path}'")
        for key, tensor in self._tensors.items():
            declared = tensor.numel() * tensor.element_size()
            held = tensor.untyped_storage().nbytes()
            if declared > held:  # an expanded view (stride 0) declaring more than its data: refuse, never allocate it
                raise ValueError(
                    f"'{path}': tensor '{key}' declares {list(tensor.shape)} ({declared} bytes) but holds only {held} "
                    "bytes of data; the checkpoint is corrupted or crafted"
                )


def _weights_of(path: Path, obj: Any, prefix: str) -> Mapping[str, Any]:
    """The weights a saved object holds: a Lightning checkpoint's ``state_dict``, a state dict, or (see
    :func:`_nested_weights`) the one entry of tensors of a dict without either."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint")
    if not any(isinstance(v, Tensor) for v in obj.values()):
        obj = _nested_weights(path, obj, prefix)
    return obj


def _check_readable(origin: str, key: str, tensor: Tensor) -> None:
    """A tensor the merge can read and the outputs can hold: dense (strided), with data, of a dtype safetensors
    stores; anything else is refused by name before any work."""
    if tensor.layout != torch.strided:
        raise ValueError(f"{origin}: tensor '{key}' is a {str(tensor.layout).replace('torch.', '')} tensor; "
                         "lightning-merge reads dense tensors: save it with .to_dense() (or leave it out)")
    if tensor.is_quantized or tensor.device.type == "meta":
        what = "quantized" if tensor.is_quantized else "on the meta device (it holds no data)"
        raise ValueError(f"{origin}: tensor '{key}' is {what}; save the model's real weights (dequantized, "
                         "materialised) to merge it")
    if tensor.dtype not in TORCH_TO_SAFETENSORS:
        raise ValueError(f"{origin}: tensor '{key}' has dtype {str(tensor.dtype).replace('torch.', '')}, which "
                         f"lightning-merge cannot read or write (it handles {', '.join(_dtype_names())}); convert it "
                         "(e.g. .to(torch.float32)) or leave it out of the state dict")


def _dtype_names() -> list[str]:
    return [str(d).replace("torch.", "") for d in TORCH_TO_SAFETENSORS]


def _nested_weights(path: Path, obj: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The weights of a ``torch.save`` file without a ``state_dict`` and without tensors at its top level, as
    ``torch.save({"model": model.state_dict(), "optimizer": ...})`` writes: the one entry that is a mapping of
    tensors; with several (``model`` and ``ema``), those under ``prefix`` (``"ema."``), flattened as ``ema.NAME``."""
    groups = {str(k): v for k, v in obj.items()
              if isinstance(v, Mapping) and any(isinstance(t, Tensor) for t in v.values())}
    if not groups:
        keys = ", ".join(repr(str(k)) for k in list(obj)[:8]) or "none"
        raise ValueError(f"'{path}' holds no tensors: no 'state_dict' and no weights among its entries ({keys}); "
                         "it is not a model checkpoint")
    if len(groups) == 1:
        key, weights = next(iter(groups.items()))
        if not prefix.startswith(f"{key}."):
            log.info("'%s' has no 'state_dict': reading the weights under its entry '%s'", path, key)
            return dict(weights)
    chosen = prefix.split(".", 1)[0] if prefix else None
    if chosen not in groups:
        listing = ", ".join(repr(k) for k in groups)
        raise ValueError(
            f"'{path}' has no 'state_dict' and holds weights under several entries ({listing}): which to merge "
            f"cannot be known; pass prefix='{next(iter(groups))}.' (Expert(..., prefix=...)) to choose one, or save "
            "the model's state dict alone"
        )
    return {f"{key}.{name}": t for key, weights in groups.items() for name, t in weights.items()}


_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


Index = tuple[Path, dict[str, str]]  # a shard index file and its weight_map (tensor name -> shard file name)


def _folder_files(folder: Path) -> tuple[str, list[Path], Index | None]:
    """How a model folder stores its weights: ``(kind, files, index)``, ``index`` when a shard index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            if special_file_kind(index) is not None:
                raise ValueError(f"'{index}' is {special_file_kind(index)}, not a shard index file")
            try:
                weight_map = json.loads(index.read_text(), object_pairs_hook=unique_keys)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise KeyError("weight_map must map tensor names to file names")
            except DuplicateKeyError as err:
                raise ValueError(f"'{index}' names {err.args[0]!r} twice; which entry is meant cannot be known: fix "
                                 "the index") from None
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ValueError(f"'{index}' is not a valid shard index ({err})") from None
            files = sorted({folder / f for f in weight_map.values()})
            outside = [f for f in weight_map.values() if Path(f).name != f]
            if outside:
                raise ValueError(f"'{index}' names shard files outside its folder ({', '.join(outside[:3])})")
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ValueError(f"'{index}' lists shard files that are missing: {', '.join(missing)}")
            kind = "safetensors" if index_name.startswith("model.safetensors") else "torch"
            return kind, files, (index, weight_map)
    try:
        files = sorted(
            p for p in folder.glob("*.safetensors")
            if p.name != SIDECAR_NAME and not p.name.endswith(SIDECAR_SUFFIX) and p.stat()
        )
    except OSError as err:
        raise ValueError(f"cannot list the weights of folder '{folder}': {err}") from None
    if len(files) > 1 and not all(_SHARD.match(p.name) for p in files):
        names = ", ".join(p.name for p in files[:4])
        raise ValueError(
            f"folder '{folder}' holds several safetensors files ({names}{' ...' if len(files) > 4 else ''}) and no "
            "model.safetensors.index.json: it looks like several models, not one; give the file of the model to merge"
        )
    if files:
        return "safetensors", files, None
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
        if (folder / name).exists():
            return "torch", [folder / name], None
    raise ValueError(
        f"folder '{folder}' holds no model weights (no model.safetensors[.index.json], *.safetensors or "
        f"pytorch_model.bin)"
    )


class Expert:
    """A lazy, read-only source of named tensors, plus the statistics captured for it.

    Args:
        source: a ``.ckpt`` Lightning checkpoint (its ``state_dict``), a ``.safetensors`` file, a ``.bin`` /
            ``.pt`` state dict, a Hugging Face style folder (sharded safetensors with an index), an in-memory
            state dict, or an ``nn.Module``. Paths may be object-storage URLs (``s3://bucket/run/last.ckpt``): the
            file (with its sidecar) or folder is fetched into the local cache once (see
            :mod:`lightning_merge.files.remote`); ``name`` stays the URL.
        prefix: keep only tensors whose name starts with this prefix, and strip it (``"model."`` for a
            LightningModule that holds its network as ``self.model``). Applies to statistic names too.
        statistics: a sidecar path or an in-memory mapping that overrides the sidecar found next to ``source``
            (``X.statistics.safetensors`` next to a file, ``statistics.safetensors`` inside a folder).
        name: a display name for messages, provenance and the merge journal (default: the path as given).
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
        self.url: str | None = None  # the object-storage URL the expert was fetched from
        self.statistics_source: Path | str | None = None  # the sidecar (or statistics file) read, if any
        self.prefix = prefix or ""
        self.lora: LoraAdapter | None = None
        self.lora_base: Expert | None = None
        self.trust_checkpoint = trust_checkpoint
        if isinstance(source, nn.Module):
            default_name = type(source).__name__
            self._source: Any = _DictSource(source.state_dict(), origin=f"expert '{name or default_name}'")
        elif isinstance(source, Mapping):
            default_name = "<state dict>"
            self._source = _DictSource(source, origin=f"expert '{name or default_name}'")
        elif isinstance(source, (str, os.PathLike)):
            default_name = redact(source)  # never a URL's credentials or signature in names, messages, provenance
            if is_url(source):
                self.url = str(source)
                try:
                    source = fetch_with_sidecar(str(source))
                except FileNotFoundError:
                    raise FileNotFoundError(f"expert '{default_name}' does not exist") from None
            path = Path(source)
            self.path = path
            try:
                exists = path.exists()
            except OSError as err:  # a symbolic link loop, a path under a file...
                raise ValueError(f"expert '{path}' cannot be opened: {err.strerror or err}") from None
            if not exists:
                raise FileNotFoundError(f"expert '{path}' does not exist")
            special = special_file_kind(path)
            if special is not None:
                raise ValueError(f"expert '{path}' is {special}, not a model file or folder: reading it could wait "
                                 "forever; give the model's file or folder")
            try:
                self._source = self._open_path(path, base, trust_checkpoint)
            except SafetensorsError as err:
                raise ValueError(f"expert '{path}': {err}") from None
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
                self.statistics_source = statistics if is_url(statistics) else Path(statistics)
            else:
                self._statistics = Statistics.from_mapping(statistics, origin=f"statistics of expert '{self.name}'")
        elif self.path is not None:
            sidecar = find_sidecar(self.path)
            if sidecar is not None:
                self._statistics = Statistics.load(sidecar)
                self.statistics_source = sidecar

        # A sidecar keyed like the checkpoint carries the prefix; an in-memory one may already be stripped.
        self._stats_prefix = ""
        if self.prefix and self._statistics is not None:
            first = itertools.islice(self._statistics.keys(), 8)
            if any(f"/{self.prefix}" in key for key in first):
                self._stats_prefix = self.prefix
        if self._statistics is not None and isinstance(statistics, (str, os.PathLike, type(None))) and not self.lora:
            self._check_statistics_names()

    def sources(self) -> list[Path | str]:
        """Every file, folder and URL this expert reads: its weights, its statistics, a LoRA adapter's base (an
        output must be none of them)."""
        found: list[Path | str] = []
        if self.path is not None:
            found.append(self.path)
        if self.url is not None:
            found.extend([self.url, sidecar_path(self.url)])
        if self.statistics_source is not None:
            found.append(self.statistics_source)
        if self.lora_base is not None:
            found.extend(self.lora_base.sources())
        return found

    def _open_path(self, path: Path, base: Any, trust_checkpoint: bool) -> Any:
        if path.is_dir() and os.path.lexists(path / INCOMPLETE_NAME):  # a copy of a folder upload that did not end
            raise incomplete(redact(self.url) if self.url else path)
        if path.is_dir() and (path / "adapter_config.json").exists():
            return self._open_adapter(path, base, trust_checkpoint)
        if is_distributed_checkpoint(path):  # read tensor by tensor, as a .ckpt: its state_dict (see distcp.py)
            checkpoint = DistributedCheckpoint(path)
            return DistcpSource(checkpoint, _weights_of(path, checkpoint.tree(), self.prefix))
        if path.is_dir():
            kind, files, index = _folder_files(path)
            source = _SafetensorsSource(files) if kind == "safetensors" else _TorchShards(files, trust_checkpoint)
            if index is not None:
                _check_index(*index, source.file_of)
            return source
        if path.suffix == ".safetensors":
            return _SafetensorsSource([path])
        return _TorchSource(path, trust_checkpoint, self.prefix)

    def _open_adapter(self, path: Path, base: Any, trust_checkpoint: bool) -> Any:
        if base is None:
            base = adapter_base_path(path)
            if base is None:
                guess = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
                raise ValueError(
                    f"'{path}' is a LoRA adapter: pass base= the model it adapts (its adapter_config.json names "
                    f"{guess!r}, which is not a local path)"
                )
        if not isinstance(base, Expert):
            base = Expert(base, trust_checkpoint=trust_checkpoint, name=str(base))
        base_expert = base
        self.lora = LoraAdapter(path, base_expert.names(), base_expert.spec, trust_checkpoint=trust_checkpoint)
        self.lora_base = base_expert
        return LoraSource(self.lora, base_expert)

    @classmethod
    def from_adapter(cls, adapter: LoraAdapter, base: Expert, *, name: str,
                     statistics: str | os.PathLike | Mapping[str, Any] | Statistics | None = None) -> Expert:
        """An expert reading θ₀ + ΔW of an adapter already opened (a
        :class:`~lightning_merge.formats.lora.LoraAdapter` built from memory, e.g. one adapter of a live
        ``PeftModel``), with its statistics keyed like the adapter."""
        expert = cls({}, name=name)
        expert.lora, expert.lora_base = adapter, base
        expert._source = LoraSource(adapter, base)
        expert._keys = {k: k for k in base.names()}
        if statistics is not None:
            expert._statistics = (Statistics.load(statistics) if isinstance(statistics, (str, os.PathLike))
                                  else Statistics.from_mapping(statistics, origin=f"statistics of adapter '{name}'"))
        return expert

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

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``name`` in its storage dtype (an adapter's θ₀ + ΔW: float32).

        Args:
            name: the tensor's name.
            rows: ``(start, stop)``: only those rows (along the first axis). A safetensors expert reads only their
                bytes; other sources read the tensor and return a view of its rows.
        """
        key = self._key(name)
        if rows is None:
            return self._source.get(key)
        if getattr(self._source, "reads_rows", False):
            return self._source.get(key, rows)
        return self._source.get(key)[rows[0]:rows[1]]

    def fingerprint(self, name: str) -> str:
        """:func:`~lightning_merge.formats.sidecar.tensor_fingerprint` of tensor ``name``, read only in the rows its
        samples fall in (a tensor of two or more dimensions): the same hash, without the tensor whole in memory."""
        shape = tuple(self.spec(name).shape)
        if len(shape) < 2 or not getattr(self._source, "reads_rows", False):  # others read a tensor whole anyway
            return tensor_fingerprint(self.tensor(name))
        return fingerprint_rows(lambda rows: self.tensor(name, rows), shape)

    def float32(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``name`` (or its ``rows``, as for :meth:`tensor`) in float32, checked to be finite (a NaN or an
        infinity would spread through a merge).

        Raises:
            ValueError: naming the expert, the tensor and the number of non-finite entries.
            DtypeRangeError: a float64 value beyond float32's range (merges compute in float32).
        """
        value = cast_checked(self.tensor(name, rows), torch.float32, name, "", where=f"expert '{self.name}': ",
                             remedy="merges compute in float32; exclude the tensor (exclude=[...]) or rescale it")
        if not all_finite(value):
            bad = count_non_finite(value)
            raise ValueError(
                f"expert '{self.name}': tensor '{name}' has {bad} NaN or infinite entries; the model diverged or the "
                "file is corrupted: leave this expert out, or exclude the tensor (exclude=[...])"
            )
        return value

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

    def statistic(self, name: str, kind: str, estimator: str | None = None,
                  rows: tuple[int, int] | None = None) -> Tensor:
        """The merge-ready float32 statistic of tensor ``name`` (see :meth:`Statistics.get`): of the tensor's
        shape, except a ``"gram"`` statistic: the (in, in) mean input Gram matrix of a linear weight (out, in); for
        a LoRA module, that of its ``lora_A`` (the module's input).

        ``rows=(start, stop)`` returns only those rows of an elementwise statistic (a sidecar file's are read from
        their bytes alone); a Gram matrix has no rows of the tensor and is refused.

        Raises:
            StatisticsError: no statistics attached, or none of that kind for this tensor.
        """
        if self._statistics is None:
            raise MissingStatistic(
                f"expert '{self.name}' has no statistics (no sidecar next to it and none passed as statistics=)"
            )
        gram = kind == GRAM
        if rows is not None:
            if gram:
                raise ValueError(f"the Gram matrix of tensor '{name}' has no rows of the tensor: read it whole")
            if self.lora is not None:  # θ₀ + ΔW's precision is computed whole: its rows
                return self.statistic(name, kind, estimator)[rows[0]:rows[1]]
            value = self._statistics.get(self._stats_prefix + name, kind, estimator, rows=rows)
            shape = self.spec(name).shape
            if tuple(value.shape) != (rows[1] - rows[0], *shape[1:]):
                raise StatisticsError(
                    f"expert '{self.name}': the {kind!r} statistic of tensor '{name}' does not have the tensor's shape "
                    f"{list(shape)}; the statistics do not belong to this expert ({self._statistics.origin})"
                )
            return value
        if self.lora is not None:
            if name in self.lora.modules:
                if gram:  # the input of ΔW = B A is lora_A's input: its Gram matrix
                    info = self.lora.modules[name]
                    if info["fan_in_fan_out"] or len(info["a_shape"]) != 2:
                        raise StatisticsError(
                            f"expert '{self.name}': tensor '{name}' is a LoRA module whose weight is not laid out "
                            "(out, in) (fan_in_fan_out or a convolution); Gram matrices apply to linear layers only")
                    value = self._statistics.get(info["a_key"], kind, estimator)
                    return self._check_gram_shape(name, value)
                return self.lora.precision(name, self._statistics, kind, estimator)
            if name in self.lora.full:  # a whole tensor the adapter saves (modules_to_save): its own statistic
                value = self._statistics.get(self.lora.full[name], kind, estimator)
                return self._check_gram_shape(name, value) if gram else value
            # The adapter does not change this tensor (ΔW = 0): it carries no curvature there, and, for RegMean, a
            # zero Gram matrix (the expert does not pull the layer; a layer no expert adapts keeps the base).
            shape = tuple(self.spec(name).shape)
            if gram:
                if len(shape) != 2:
                    raise MissingStatistic(f"expert '{self.name}' has no Gram matrix for tensor '{name}' (not a "
                                           "linear weight)")
                return torch.zeros(shape[1], shape[1], dtype=torch.float32)
            return torch.zeros(shape, dtype=torch.float32)
        value = self._statistics.get(self._stats_prefix + name, kind, estimator)
        if gram:
            return self._check_gram_shape(name, value)
        shape = self.spec(name).shape
        if tuple(value.shape) != tuple(shape):
            raise StatisticsError(
                f"expert '{self.name}': the {kind!r} statistic of tensor '{name}' has shape {list(value.shape)}, the "
                f"tensor {list(shape)}; the statistics do not belong to this expert ({self._statistics.origin})"
            )
        return value

    def _check_gram_shape(self, name: str, value: Tensor) -> Tensor:
        """A Gram matrix multiplies the last axis of a 2-D weight (nn.Linear's input features): (in, in)."""
        shape = tuple(self.spec(name).shape)
        if len(shape) != 2 or tuple(value.shape) != (shape[1], shape[1]):
            raise StatisticsError(
                f"expert '{self.name}': the Gram matrix of tensor '{name}' has shape {list(value.shape)}, but the "
                f"tensor is {list(shape)}: a Gram matrix is (in, in) for a linear weight (out, in); the statistics do "
                f"not belong to this expert ({self._statistics.origin if self._statistics else '?'})"
            )
        return value


class _TorchShards(_DictSource):
    """The state dicts of several ``.bin`` shards as one; a tensor name in two shards is an error naming both, as for
    safetensors shards."""

    def __init__(self, files: list[Path], trust_checkpoint: bool):
        tensors: dict[str, Tensor] = {}
        self._origin: dict[str, Path] = {}
        for file in files:
            for key, value in _TorchSource(file, trust_checkpoint)._tensors.items():
                if key in self._origin:
                    raise ValueError(
                        f"tensor '{key}' is in both '{self._origin[key]}' and '{file}': the folder holds two models or "
                        "a stray shard; remove the extra file, or give the file of the model to merge"
                    )
                tensors[key] = value
                self._origin[key] = file
        super().__init__(tensors)

    def file_of(self, key: str) -> Path | None:
        return self._origin.get(key)


def _check_index(index: Path, weight_map: dict[str, str], file_of: Any) -> None:
    """Every tensor a shard index lists is in the shard it names (a loader that trusts the index would drop it, or
    read it from another file)."""
    wrong = [(name, shard, file_of(name)) for name, shard in weight_map.items()
             if file_of(name) is None or file_of(name).name != shard]
    if wrong:
        name, shard, holder = wrong[0]
        where = "no shard holds it" if holder is None else f"it is in '{holder.name}'"
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(
            f"'{index}' lists tensor '{name}' in shard '{shard}', but {where}{more}: the index does not describe these "
            "shards (a shard from another save, or a damaged download); re-save or re-download the model"
        )


def as_expert(obj: Any, what: str = "expert", base: Any = None) -> Expert:
    """Return ``obj`` if it is an :class:`Expert`, else open it as one (``base``: for a LoRA adapter folder)."""
    if isinstance(obj, Expert):
        return obj
    try:
        return Expert(obj, base=base)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} '{obj}' does not exist") from None


__all__ = ["SAFETENSORS_DTYPES", "CheckpointError", "Expert", "TensorSpec", "as_expert", "load_torch_file"]
