"""Where merged tensors go: a state dict, a live module, a sharded safetensors folder, a single safetensors file,
or a Lightning checkpoint. Every file output is written under a temporary name and renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.experts import SAFETENSORS_DTYPES, TensorSpec
from lightning_merge.io import atomic_file, fsync_dir, partial_path, replace_dir

TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


class Writer:
    """Receives merged tensors (possibly from several threads) and makes them durable in :meth:`finish`."""

    def write(self, name: str, tensor: Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> Any:
        """Make the result visible; return what ``merge`` returns."""
        return None

    def abort(self) -> None:
        """Discard a partial result (called on any error)."""


class DictWriter(Writer):
    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._order: list[str] = []

    def plan(self, names: Sequence[str]) -> None:
        self._order = list(names)

    def write(self, name: str, tensor: Tensor) -> None:
        self.tensors[name] = tensor

    def finish(self) -> dict[str, Tensor]:
        return {n: self.tensors[n] for n in self._order if n in self.tensors}


class ModuleWriter(Writer):
    """Copies each merged tensor into the module's parameter or buffer of that name, as it is produced."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module = module
        self.targets = module.state_dict(keep_vars=True)
        missing = [n for n in names if n not in self.targets]
        extra = [n for n in self.targets if n not in set(names)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the merge produces tensors the module lacks: {', '.join(missing[:5])}")
            if extra:
                parts.append(f"the module has tensors the merge does not produce: {', '.join(extra[:5])}")
            raise ValueError(
                f"cannot load the merge into {type(module).__name__}: {'; '.join(parts)}. Open the experts with "
                f"prefix= so their names match the module's, or merge into a sub-module"
            )

    def write(self, name: str, tensor: Tensor) -> None:
        target = self.targets[name]
        with torch.no_grad():
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    def finish(self) -> nn.Module:
        return self.module


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"`` or a number of bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace("IB", "B")
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class _Shard:
    """A safetensors file whose header is known up front, so tensors are written at their offsets as they come."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, TensorSpec]], metadata: dict[str, str]):
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, spec in entries:
            size = spec.nbytes
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + size],
            }
            self.offsets[name] = (offset, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.total)
        _pwrite_all(self.fd, struct.pack("<Q", len(raw)) + raw, 0)

    def write(self, name: str, tensor: Tensor) -> None:
        offset, size = self.offsets[name]
        data = tensor.detach().contiguous().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        view = data.view(torch.uint8).numpy()
        if view.nbytes != size:
            raise RuntimeError(f"tensor '{name}' has {view.nbytes} bytes, planned {size}")
        _pwrite_all(self.fd, memoryview(view), self.data_start + offset)

    def close(self, sync: bool) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class SafetensorsWriter(Writer):
    """A Hugging Face style folder (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index), or one
    ``.safetensors`` file when ``single_file``.

    Args:
        out: the folder (or file) to create.
        entries: every output tensor with its final shape and dtype, in writing order.
        shard_size: largest shard in bytes (a tensor larger than this gets a shard of its own).
        copy_from: a folder whose non-weight files (config.json, tokenizer files...) are copied in.
        provenance: written as ``lightning_merge.json`` in the folder (and in each file's metadata).
        overwrite: replace an existing ``out`` once the new one is complete.
    """

    def __init__(
        self,
        out: Path,
        entries: Sequence[tuple[str, TensorSpec]],
        *,
        shard_size: int = 5 << 30,
        copy_from: Path | None = None,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
        single_file: bool = False,
    ):
        self.out = out
        self.single_file = single_file
        self.copy_from = copy_from
        self.provenance = provenance or {}
        check_output_path(out, overwrite)
        self.tmp = partial_path(out)
        groups: list[list[tuple[str, TensorSpec]]] = [[]]
        size = 0
        for name, spec in entries:
            if groups[-1] and size + spec.nbytes > shard_size and not single_file:
                groups.append([])
                size = 0
            groups[-1].append((name, spec))
            size += spec.nbytes
        metadata = {"format": "pt", "lightning_merge": json.dumps(self.provenance, default=str)}
        self.shards: list[_Shard] = []
        self.shard_of: dict[str, _Shard] = {}
        if single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            paths = [self.tmp]
        else:
            self.tmp.mkdir(parents=True)
            n = len(groups)
            names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            paths = [self.tmp / name for name in names]
        self.total_size = sum(spec.nbytes for _, spec in entries)
        try:
            for path, group in zip(paths, groups):
                shard = _Shard(path, group, metadata)
                self.shards.append(shard)
                for name, _ in group:
                    self.shard_of[name] = shard
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor) -> None:
        self.shard_of[name].write(name, tensor)

    def finish(self) -> Path:
        for shard in self.shards:
            shard.close(sync=True)
        if self.single_file:
            os.replace(self.tmp, self.out)
            fsync_dir(self.out.parent)
            return self.out
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: shard.path.name for name, shard in self.shard_of.items()},
            }
            _write_json(self.tmp / "model.safetensors.index.json", index)
        if self.copy_from is not None:
            copy_support_files(self.copy_from, self.tmp)
        _write_json(self.tmp / "lightning_merge.json", self.provenance)
        replace_dir(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        for shard in self.shards:
            shard.close(sync=False)
        if self.single_file:
            self.tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class CheckpointWriter(Writer):
    """A Lightning checkpoint whose ``state_dict`` holds the merged tensors.

    With a template checkpoint (the base's, or the first expert's), its other entries are kept (hyper-parameters,
    epoch, global step, tensors outside the merged prefix) so ``LightningModule.load_from_checkpoint`` works;
    optimizer and scheduler states are dropped (they belong to the template's weights, not the merge): the result
    loads like a ``save_weights_only`` checkpoint.
    """

    def __init__(self, out: Path, *, template: Path | None, prefix: str, provenance: dict[str, Any],
                 overwrite: bool, trust_checkpoint: bool = False):
        check_output_path(out, overwrite)
        self.out = out
        self.template = template
        self.prefix = prefix
        self.provenance = provenance
        self.trust_checkpoint = trust_checkpoint
        self.tensors: dict[str, Tensor] = {}

    def write(self, name: str, tensor: Tensor) -> None:
        self.tensors[self.prefix + name] = tensor

    def finish(self) -> Path:
        from lightning_merge.experts import load_torch_file

        if self.template is not None:
            checkpoint = dict(load_torch_file(self.template, self.trust_checkpoint))
            state = dict(checkpoint.get("state_dict", {}))
        else:
            checkpoint = {"pytorch-lightning_version": _lightning_version(), "epoch": 0, "global_step": 0}
            state = {}
        for key in ("optimizer_states", "lr_schedulers", "loops"):
            checkpoint.pop(key, None)
        state.update(self.tensors)
        checkpoint["state_dict"] = state
        checkpoint["lightning_merge"] = json.loads(json.dumps(self.provenance, default=str))
        with atomic_file(self.out) as tmp:
            torch.save(checkpoint, tmp)
        return self.out


def _lightning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning")
    except PackageNotFoundError:
        return "2.0.0"


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"output '{out}' already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def copy_support_files(src: Path, dst: Path) -> None:
    """Copy a model folder's non-weight files (config, generation config, tokenizer) into ``dst``."""
    from lightning_merge.stats import SIDECAR_NAME

    for item in src.iterdir():
        if not item.is_file() or item.name == SIDECAR_NAME or item.name == "lightning_merge.json":
            continue
        if item.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(item, dst / item.name)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
