"""Distributed checkpoints (``torch.distributed.checkpoint``) read lazily, one tensor at a time.

Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy(state_dict_type="sharded")`` (and ``torch.distributed
.checkpoint.save``) write a checkpoint as a folder: ``.metadata`` lists every tensor (global shape, dtype, and the
chunks each rank saved, with the file, offset and length of each chunk), ``__<rank>_0.distcp`` files hold the chunks
(each one a small ``torch.save`` record), and Lightning adds ``meta.pt`` (epoch, step, loops, callbacks...).

:class:`DistributedCheckpoint` reads ``.metadata`` with an unpickler that accepts only the classes of that format
(the format is a pickle: a plain ``pickle.load`` of a crafted file would run its code), checks that every chunk's
file exists and holds the bytes the metadata points to, and assembles one full tensor from its chunks on request
(``torch.load(weights_only=True)`` of each chunk): a reader holds one tensor (plus one chunk while it is copied in),
never the whole checkpoint, and needs no process group.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.capture.second_moments import collapse
from lightning_merge.errors import CheckpointError
from lightning_merge.files.safetensors import TORCH_TO_SAFETENSORS, TensorSpec
from lightning_merge.files.torch_load import load_torch_file
from lightning_merge.formats.sidecar import Statistics

METADATA_NAME = ".metadata"
LIGHTNING_META_NAME = "meta.pt"
SHARD_SUFFIX = ".distcp"

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # Python >= 3.13
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file: only the classes of the distributed-checkpoint format (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def is_distributed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a distributed-checkpoint folder (it holds ``.metadata``).

    Raises:
        CheckpointError: the folder has the shard files or the ``meta.pt`` of one, but no ``.metadata`` (a save that
            did not finish, or a partial copy).
    """
    if not path.is_dir():
        return False
    if (path / METADATA_NAME).is_file():
        return True
    found = sorted(p.name for p in path.glob(f"*{SHARD_SUFFIX}"))
    if found:
        raise CheckpointError(
            f"'{path}' holds distributed-checkpoint shards ({', '.join(found[:3])}{' ...' if len(found) > 3 else ''}) "
            f"but no '{METADATA_NAME}', which lists the tensors they hold: the save did not finish, or the folder was "
            "copied without its hidden files; copy the whole folder (cp -r, rsync -a)"
        )
    return False


def _slices(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


def _overlap(a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    return all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))


class DistributedCheckpoint:
    """A ``torch.distributed.checkpoint`` folder: its tensors by their flattened name (``state_dict.layer.weight``,
    ``optimizer_0.state.layer.weight.exp_avg_sq``), read one at a time.

    Args:
        folder: the checkpoint folder (the one holding ``.metadata``).

    Raises:
        CheckpointError: ``.metadata`` is not the metadata of a distributed checkpoint (or holds anything else than its
            classes: it is refused without being run), a chunk's file is missing or shorter than the metadata says, or
            the chunks of a tensor do not tile it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        metadata_path = self.path / METADATA_NAME
        try:
            with open(metadata_path, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
        except FileNotFoundError:
            raise CheckpointError(f"'{self.path}' is not a distributed checkpoint: no '{METADATA_NAME}'") from None
        except Exception as err:  # UnpicklingError, EOFError, AttributeError... by case
            reason = f"it refers to {str(err)[7:]}, which is no part of that format (refused, not run: the file is " \
                     "crafted or damaged, or written by a torch whose format lightning-merge does not know yet)" \
                if str(err).startswith("GLOBAL ") else f"{type(err).__name__}: {err}"
            raise CheckpointError(f"'{metadata_path}' is not the metadata of a distributed checkpoint: {reason}") \
                from None
        entries = getattr(metadata, "state_dict_metadata", None)
        if type(metadata).__name__ != "Metadata" or not isinstance(entries, dict):
            raise CheckpointError(f"'{metadata_path}' holds a {type(metadata).__name__}, not the metadata of a "
                                  "distributed checkpoint")
        self.specs: dict[str, TensorSpec] = {}
        self.objects: dict[str, Any] = {}  # non-tensor entries (an optimizer's betas): their storage info
        self._leaves: dict[int, tuple[Tensor, str]] = {}
        self._chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], Any]]] = {}
        try:
            self._index(metadata, entries)
        except (AttributeError, TypeError, ValueError) as err:  # records of the right classes holding wrong values
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"'{metadata_path}' is damaged: {type(err).__name__}: {err}") from None

    def _index(self, metadata: Any, entries: dict) -> None:
        """Every tensor's spec and chunks, and where each chunk lies, checked."""
        storage = getattr(metadata, "storage_data", None) or {}
        where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for index, info in storage.items():
            offset = tuple(index.offset) if getattr(index, "offset", None) is not None else None
            where[(index.fqn, offset)] = info
        sizes: dict[str, int] = {}
        for fqn, entry in entries.items():
            if type(entry).__name__ == "BytesStorageMetadata":
                self.objects[fqn] = self._locate(where, fqn, None, sizes)
                continue
            shape = tuple(int(d) for d in entry.size)
            dtype = entry.properties.dtype
            if dtype not in TORCH_TO_SAFETENSORS:
                raise CheckpointError(f"'{self.path}': tensor '{fqn}' has dtype {str(dtype).replace('torch.', '')}, "
                                      "which lightning-merge cannot read or write")
            chunks = [(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in entry.chunks]
            self._check_tiling(fqn, shape, chunks)
            self.specs[fqn] = TensorSpec(shape, dtype)
            self._chunks[fqn] = [(o, s, self._locate(where, fqn, o, sizes)) for o, s in chunks]
        planner = getattr(metadata, "planner_data", None)
        self.paths: dict[str, tuple[str, ...]] = {
            fqn: tuple(str(p) for p in planner[fqn]) if isinstance(planner, Mapping) and isinstance(
                planner.get(fqn), (tuple, list)) and planner[fqn] else (fqn,)
            for fqn in [*self.specs, *self.objects]
        }

    def _locate(self, where: dict, fqn: str, offsets: tuple[int, ...] | None, sizes: dict[str, int]) -> Any:
        """The storage info of one chunk, checked: a file of the folder that exists and holds its bytes."""
        info = where.get((fqn, offsets))
        if info is None:
            raise CheckpointError(f"'{self.path / METADATA_NAME}' lists tensor '{fqn}' but not where its data is: the "
                                  "metadata is damaged")
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"'{self.path / METADATA_NAME}' places tensor '{fqn}' in {name!r}, not a file of "
                                  "the checkpoint's folder: the metadata is damaged or crafted")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"'{self.path}': tensor '{fqn}' is stored with transforms "
                                  f"{list(info.transform_descriptors)} (compression), which lightning-merge does not "
                                  "read; save the checkpoint without them")
        if name not in sizes:
            try:
                sizes[name] = (self.path / name).stat().st_size
            except FileNotFoundError:
                raise CheckpointError(
                    f"distributed checkpoint '{self.path}' is missing its shard file '{name}' (its .metadata lists "
                    "tensors in it): the save did not finish on every rank, or the folder was copied partially; copy "
                    "the whole folder"
                ) from None
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[name]:
            raise CheckpointError(f"'{self.path / name}' is truncated: tensor '{fqn}' needs bytes {info.offset} to "
                                  f"{info.offset + info.length}, the file has {sizes[name]}")
        return info

    def _check_tiling(self, fqn: str, shape: tuple[int, ...], chunks: list) -> None:
        """The chunks of a tensor cover it exactly: inside it, without overlap, their sizes summing to its size."""
        total = 0
        for offsets, sizes in chunks:
            if len(offsets) != len(shape) or any(o < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
                raise CheckpointError(f"'{self.path / METADATA_NAME}': a chunk of tensor '{fqn}' (at {list(offsets)}, "
                                      f"{list(sizes)}) lies outside its shape {list(shape)}: the metadata is damaged")
            numel = 1
            for s in sizes:
                numel *= s
            total += numel
        ordered = sorted((c for c in chunks if all(chunk for chunk in c[1])), key=lambda c: c[0])
        active: list = []
        for chunk in ordered:  # a sweep along the first axis: only chunks spanning the same rows can overlap
            if shape:
                active = [a for a in active if a[0][0] + a[1][0] > chunk[0][0]]
            if any(_overlap(a, chunk) for a in active):
                raise CheckpointError(f"'{self.path / METADATA_NAME}': chunks of tensor '{fqn}' overlap: the metadata "
                                      "is damaged")
            active.append(chunk)
        expected = 1
        for d in shape:
            expected *= d
        if total != expected:
            raise CheckpointError(f"'{self.path / METADATA_NAME}': the chunks of tensor '{fqn}' hold {total} of its "
                                  f"{expected} entries: the metadata is damaged")

    def _read(self, fqn: str, info: Any) -> Any:
        """One stored record (a chunk, or an object), loaded without unpickling arbitrary objects."""
        path = self.path / info.relative_path
        try:
            with open(path, "rb") as file:
                file.seek(info.offset)
                data = file.read(info.length)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"distributed checkpoint '{self.path}' is missing its shard file "
                                  f"'{info.relative_path}' (removed since it was opened)") from None
        except Exception as err:  # torch raises UnpicklingError, RuntimeError... by case
            text = " ".join(str(err).split())[:200]
            raise CheckpointError(f"cannot read tensor '{fqn}' from '{path}': {type(err).__name__}: {text}") from None

    def spec(self, fqn: str) -> TensorSpec:
        """Shape and dtype of tensor ``fqn``, from the metadata (nothing is read)."""
        return self.specs[fqn]

    def get(self, fqn: str) -> Tensor:
        """Tensor ``fqn`` whole, assembled from its chunks."""
        spec = self.specs[fqn]
        chunks = self._chunks[fqn]
        out = None if len(chunks) == 1 else torch.empty(spec.shape, dtype=spec.dtype)  # one chunk: the tensor itself
        for offsets, sizes, info in chunks:
            piece = self._read(fqn, info)
            if not isinstance(piece, Tensor) or tuple(piece.shape) != sizes or piece.dtype != spec.dtype:
                what = f"{list(piece.shape)} {piece.dtype}" if isinstance(piece, Tensor) else type(piece).__name__
                raise CheckpointError(f"'{self.path / info.relative_path}': the chunk of tensor '{fqn}' at "
                                      f"{list(offsets)} is {what}, its metadata says {list(sizes)} {spec.dtype}: the "
                                      "checkpoint is damaged")
            if out is None:
                return piece
            out[_slices(offsets, sizes)] = piece
            del piece
        return out if out is not None else torch.empty(spec.shape, dtype=spec.dtype)

    def object(self, fqn: str) -> Any:
        """A non-tensor entry (an optimizer's ``betas``, a parameter group's ``params``), loaded with
        ``weights_only=True``."""
        return self._read(fqn, self.objects[fqn])

    def lightning_meta(self, trust_checkpoint: bool = False) -> dict[str, Any]:
        """Lightning's ``meta.pt`` (epoch, global step, loops, callbacks, hyper-parameters), ``{}`` without one."""
        path = self.path / LIGHTNING_META_NAME
        if not path.is_file():
            return {}
        meta = load_torch_file(path, trust_checkpoint)
        if not isinstance(meta, Mapping):
            raise CheckpointError(f"'{path}' holds a {type(meta).__name__}, not Lightning's checkpoint metadata")
        return dict(meta)

    def summary(self) -> dict[str, Any]:
        """What ``lightning-merge inspect`` shows: shard files, step and epoch (from ``meta.pt``, when it loads
        safely), and how many tensors of optimizer state (``exp_avg_sq``) it holds."""
        files = {info.relative_path for chunks in self._chunks.values() for *_, info in chunks}
        out: dict[str, Any] = {"shard_files": len(files)}
        try:
            meta = self.lightning_meta()
        except CheckpointError:  # custom objects in its hyper-parameters: not read here
            meta = {}
        out.update({key: meta[key] for key in ("global_step", "epoch") if isinstance(meta.get(key), int)})
        out["exp_avg_sq"] = sum(1 for p in self.paths.values() if len(p) == 4 and p[1] == "state"
                                and p[3] == "exp_avg_sq")
        return out

    def tree(self) -> dict[str, Any]:
        """The checkpoint's nesting as saved, with meta-device tensors (shape and dtype, no data) for its tensors and
        ``None`` for other entries: ``{"state_dict": {"layer.weight": <meta>}, "optimizer_0": {"state": ...}}``
        (:meth:`fqn` names the tensor a leaf stands for). Lightning's ``FSDPStrategy`` saves the weights under
        ``"model"``: with its ``meta.pt``, that entry is the ``state_dict`` a ``.ckpt`` would hold."""
        tree: dict[str, Any] = {}
        for fqn, path in self.paths.items():
            node = tree
            for part in path[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    break
                node = child
            else:
                spec = self.specs.get(fqn)
                leaf = None
                if spec is not None:
                    leaf = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
                    self._leaves[id(leaf)] = (leaf, fqn)  # the leaf is kept, so its id stays its own
                node[path[-1]] = leaf
        lightning = (self.path / LIGHTNING_META_NAME).is_file()
        if lightning and "state_dict" not in tree and isinstance(tree.get("model"), dict):
            tree["state_dict"] = tree.pop("model")
        return tree

    def fqn(self, leaf: Tensor) -> str:
        """The flattened name of the tensor a :meth:`tree` leaf stands for."""
        return self._leaves[id(leaf)][1]


class DistcpSource:
    """The weights of a distributed checkpoint as an expert's source: ``weights`` maps each name to its leaf of
    :meth:`DistributedCheckpoint.tree` (the ``state_dict`` of a Lightning checkpoint); each tensor is read whole on
    request."""

    def __init__(self, checkpoint: DistributedCheckpoint, weights: Mapping[str, Tensor]):
        self.checkpoint = checkpoint
        self._fqns = {name: checkpoint.fqn(t) for name, t in weights.items() if isinstance(t, Tensor)}

    def keys(self) -> list[str]:
        return list(self._fqns)

    def file_of(self, key: str) -> Path | None:
        return self.checkpoint.path if key in self._fqns else None

    def spec(self, key: str) -> TensorSpec:
        return self.checkpoint.spec(self._fqns[key])

    def get(self, key: str) -> Tensor:
        return self.checkpoint.get(self._fqns[key])


class _LazyTensors(Mapping):
    """``key -> tensor`` over a checkpoint's tensors, each read when asked for."""

    def __init__(self, checkpoint: DistributedCheckpoint, fqns: Mapping[str, str]):
        self.checkpoint = checkpoint
        self.fqns = dict(fqns)

    def __getitem__(self, key: str) -> Tensor:
        return self.checkpoint.get(self.fqns[key])

    def __contains__(self, key: object) -> bool:
        return key in self.fqns

    def __iter__(self) -> Iterator[str]:
        return iter(self.fqns)

    def __len__(self) -> int:
        return len(self.fqns)


def optimizer_second_moments(source: str | os.PathLike | DistributedCheckpoint) -> Statistics:
    """Adam's second moments saved in a distributed checkpoint's optimizer state, as :class:`Statistics` of kind
    ``exp_avg_sq`` (raw, with β₂ per parameter group and the step per parameter, as a capture records them), keyed
    by parameter name as the optimizer state keys them (``model.layer.weight``: a LightningModule's names).

    Each tensor is read when asked for. A parameter whose state records step 0 is left out (nothing to
    bias-correct). Use it with :func:`~lightning_merge.formats.sidecar.export_second_moments`, or as an expert's
    ``statistics=``.

    Args:
        source: the checkpoint folder, or a :class:`DistributedCheckpoint` already open.

    Raises:
        CheckpointError: the checkpoint holds no optimizer state with ``exp_avg_sq`` (an optimizer other than
            Adam-like, or a checkpoint saved without the optimizer).
    """
    checkpoint = source if isinstance(source, DistributedCheckpoint) else DistributedCheckpoint(source)
    by_path = {path: fqn for fqn, path in checkpoint.paths.items()}
    beta2_of: dict[tuple[str, str], float] = {}
    for path, fqn in by_path.items():  # each parameter group's params and betas
        if len(path) == 4 and path[1] == "param_groups" and path[3] == "params":
            betas = (path[0], "param_groups", path[2], "betas")
            if betas in by_path:
                beta2 = float(checkpoint.object(by_path[betas])[1])
                beta2_of.update({(path[0], str(name)): beta2 for name in checkpoint.object(fqn)})
    tensors: dict[str, str] = {}
    beta2: dict[str, float] = {}
    steps: dict[str, int] = {}
    unstepped = []
    for path, fqn in by_path.items():
        if len(path) != 4 or path[1] != "state" or path[3] != "exp_avg_sq":
            continue
        optimizer, name = path[0], path[2]
        step_fqn = by_path.get((optimizer, "state", name, "step"))
        step = 0 if step_fqn is None else (checkpoint.get(step_fqn) if step_fqn in checkpoint.specs
                                           else checkpoint.object(step_fqn))
        step = int(step.item() if isinstance(step, Tensor) else step)
        if step <= 0:
            unstepped.append(name)
            continue
        if (optimizer, name) not in beta2_of:
            raise CheckpointError(f"'{checkpoint.path}': the optimizer state of '{name}' has exp_avg_sq but no "
                                  f"parameter group with betas lists it: the checkpoint's '{optimizer}' is incomplete")
        tensors[f"exp_avg_sq/{name}"] = fqn
        beta2[name] = beta2_of[(optimizer, name)]
        steps[name] = step
    if not tensors:
        raise CheckpointError(f"'{checkpoint.path}' holds no Adam second moments (exp_avg_sq) in an optimizer state"
                              + (f" that has taken a step ({len(unstepped)} at step 0)" if unstepped else "")
                              + ": save it with an Adam-like optimizer's state (not weights only)")
    meta: dict[str, Any] = {"estimator": "adam", "beta2": collapse(beta2), "step": collapse(steps),
                            "source": "optimizer state"}
    if unstepped:
        meta["unstepped"] = sorted(unstepped)
    return Statistics(_LazyTensors(checkpoint, tensors), {"exp_avg_sq": meta},
                      f"the optimizer state of '{checkpoint.path}'")


def checkpoint_template(path: Path | None) -> Path | None:
    """The file whose entries (epoch, step, hyper-parameters) a merge written as ``.ckpt`` keeps: a ``.ckpt``
    file itself, a distributed checkpoint's ``meta.pt``; None for anything else."""
    if path is None or path.suffix != ".ckpt":
        return None
    if path.is_dir():
        meta = path / LIGHTNING_META_NAME
        return meta if meta.is_file() and (path / METADATA_NAME).is_file() else None
    return path


__all__ = ["DistcpSource", "DistributedCheckpoint", "checkpoint_template", "is_distributed_checkpoint",
           "optimizer_second_moments"]
