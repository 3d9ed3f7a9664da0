"""Capture on sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``, as Lightning's
``ModelParallelStrategy`` applies it in ``configure_model``), where parameters, gradients and Adam's state are
``DTensor`` shards.

The rule everywhere: a rank holds its shards plus at most ONE full tensor. A full tensor is made by
``DTensor.full_tensor()``, a collective: every rank calls the functions below in the same order, one tensor at a
time, never the whole model at once. Elementwise statistics (the batch Fisher's w·g²) are accumulated on the local
shard (FSDP2's reduce-scattered gradient is the shard of the mean gradient DDP would all-reduce), and a sidecar is
written by gathering tensor by tensor into one safetensors file that rank 0 writes as the tensors come
(:func:`write_gathered`): the file is the same as one process writes, so its readers need no change.

Pure torch: no Lightning import (the trainer's broadcast is passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_merge.capture.sharding import Sharding, is_dtensor
from lightning_merge.files.remote import output_file
from lightning_merge.files.safetensors import ShardWriter, TensorSpec
from lightning_merge.formats.sidecar import (
    GRAM,
    RESUME_PREFIX,
    encode,
    encode_gram,
    sidecar_name,
    statistics_header,
    tensor_fingerprint,
)

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch has no FSDP2
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

SHARDED_IN_MEMORY = (
    "CurvatureCapture.{} is not supported on a sharded (FSDP2) module yet: its statistics are shards on each rank. "
    "read the sidecars the capture wrote (X.statistics.safetensors beside each checkpoint, "
    "final.statistics.safetensors)"
)
Share = Callable[[Any], Any]  # broadcast a picklable value from rank 0 to every rank (the trainer's strategy)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (collective for a ``DTensor``: every rank must call it), else ``tensor`` itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a plain tensor), else ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like(shard: Tensor, reference: Tensor) -> Tensor:
    """``shard`` (this rank's part, shaped as ``reference.to_local()``) as a ``DTensor`` laid out as ``reference``;
    ``shard`` itself when ``reference`` is not sharded. No communication."""
    if not is_dtensor(reference):
        return shard
    return DTensor.from_local(shard, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


def shard_like(whole: Tensor, reference: Tensor) -> Tensor:
    """This rank's part of ``whole`` (a full tensor every rank holds) as ``reference`` is sharded (a plain tensor, on
    ``reference``'s device); ``whole`` when ``reference`` is not sharded. No communication."""
    if not is_dtensor(reference):
        return whole
    placed = distribute_tensor(whole.to(reference.to_local().device), reference.device_mesh, reference.placements,
                               src_data_rank=None)
    return placed.to_local()


def fingerprints(named: Iterable[tuple[str, Tensor]]) -> dict[str, str]:
    """``{name: tensor_fingerprint}`` of every tensor, each gathered whole one at a time (collective for sharded
    tensors: every rank must call it with the same names in the same order), so a sharded model fingerprints as
    the same model unsharded."""
    out = {}
    for name, tensor in named:
        out[name] = tensor_fingerprint(full(tensor.detach()))
    return out


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over every rank (collective; one process: ``flag``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def checkpoint_sidecar(checkpoint: str | Path) -> Path:
    """The sidecar of a checkpoint written by the strategy, file or folder (a distributed checkpoint ``X.ckpt/``):
    ``X.statistics.safetensors`` beside it, named as for a file."""
    path = Path(checkpoint)
    return path.with_name(sidecar_name(path.name))


Encoder = Callable[[str, Tensor], Mapping[str, Tensor]]


def _stored_specs(key: str, value: Tensor, compression: str | None) -> list[tuple[str, TensorSpec]]:
    """The stored tensors of a sharded statistic under ``compression`` (None: the tensor as it is), as
    :func:`lightning_merge.formats.sidecar.encode` makes them, from its global shape alone."""
    shape = tuple(value.shape)
    if compression is None:
        return [(key, TensorSpec(shape, value.dtype))]
    if compression == "bfloat16":
        return [(key, TensorSpec(shape, torch.bfloat16))]
    if compression == "rank1" and len(shape) == 2:
        return [(f"{key}:row", TensorSpec((shape[0],), torch.float32)),
                (f"{key}:col", TensorSpec((shape[1],), torch.float32))]
    return [(key, TensorSpec(shape, torch.float32))]


def write_gathered(
    path: str | Path | None,
    items: Sequence[tuple[str, Tensor, Encoder, str | None]],
    metadata: Mapping[str, str],
    *,
    share: Share,
    replace: str = "own",
) -> None:
    """Write one safetensors file from tensors some of which are sharded, gathering them one at a time.

    Every rank calls it with the same sharded items in the same order (plain items may differ: only the writer's
    are read); the writer is the rank whose ``path`` is not None (rank 0). The writer plans the file from the global
    shapes, encodes its plain items first, then gathers each sharded item (``full_tensor``: every rank) and writes it
    at its offset: a rank holds its shards plus one full tensor. The file appears atomically, complete or not at all.
    A failure on the writer (a refused path, a full disk) does not strand the others: it keeps taking part in the
    gathers, then every rank raises (the writer its own error, the others a ``RuntimeError`` quoting it).

    Args:
        path: the file (on the writer), None on the other ranks.
        items: ``(key, tensor, encode, compression)``: ``encode(key, full tensor)`` gives the stored tensors and
            ``compression`` (as :func:`~lightning_merge.formats.sidecar.encode`'s, or None for the tensor as it is)
            their planned shapes for a sharded tensor.
        metadata: the ``__metadata__`` strings.
        share: broadcast from rank 0 (``trainer.strategy.broadcast``), used once at the end.
        replace: what may be at ``path`` (see :func:`lightning_merge.files.remote.output_file`).
    """
    writer = path is not None
    gathers = [(key, tensor, enc) for key, tensor, enc, _ in items if is_dtensor(tensor)]
    done = 0
    error: BaseException | None = None
    if writer:
        try:
            plain: dict[str, Tensor] = {}
            entries: list[tuple[str, TensorSpec]] = []
            for key, tensor, enc, compression in items:
                if is_dtensor(tensor):
                    entries.extend(_stored_specs(key, tensor, compression))
                else:
                    stored = dict(enc(key, tensor))
                    plain.update(stored)
                    entries.extend((k, TensorSpec(tuple(t.shape), t.dtype)) for k, t in stored.items())
            with output_file(path, replace=replace) as tmp:
                out = ShardWriter(tmp, entries, metadata)
                try:
                    for key, tensor in plain.items():
                        out.write(key, tensor)
                    plain.clear()
                    for key, tensor, enc in gathers:
                        whole = tensor.full_tensor()
                        done += 1
                        for k, t in enc(key, whole).items():
                            out.write(k, t)
                        del whole
                finally:
                    out.close(sync=False)
        except BaseException as err:  # noqa: BLE001 - shared below, raised on every rank
            error = err
    for _, tensor, _ in gathers[done:]:  # the others (and a writer that failed) finish every gather
        tensor.full_tensor()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message = share(None if error is None else f"{type(error).__name__}: {error}")
        if message is not None and error is None:
            raise RuntimeError(f"writing {metadata.get('format', 'a file')} failed on rank 0: {message}")
    if error is not None:
        raise error


def write_statistics_gathered(
    path: str | Path | None,
    statistics: Mapping[str, Mapping[str, Tensor]],
    kinds: Mapping[str, Mapping[str, Any]],
    *,
    compression: str,
    share: Share,
    resume: Mapping[str, Mapping[str, Tensor]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """:func:`~lightning_merge.formats.sidecar.write_statistics` for statistics some of which are sharded
    (``DTensor``): the same file, gathered tensor by tensor (see :func:`write_gathered`; every rank calls it,
    ``path`` None except on the writer)."""
    kinds_meta, meta = statistics_header(str(path), statistics, kinds, compression, metadata)
    items: list[tuple[str, Tensor, Encoder, str | None]] = []
    stored_f32: set[str] = set()
    for kind, per_name in statistics.items():
        for name, value in per_name.items():
            key = f"{kind}/{name}"
            if kind == GRAM:
                form, rank = kinds_meta[kind]["form"], int(kinds_meta[kind].get("rank", 64))
                items.append((key, value, lambda k, t, f=form, r=rank: encode_gram(k, t, f, r), None))
            else:
                items.append((key, value, lambda k, t: encode(k, t, compression), compression))
                if compression == "float32" or (compression == "rank1" and value.dim() != 2):
                    stored_f32.add(key)
    for kind, per_name in (resume or {}).items():
        for name, value in per_name.items():
            if f"{kind}/{name}" not in stored_f32:  # else already stored exactly
                items.append((f"{RESUME_PREFIX}{kind}/{name}", value, lambda k, t: encode(k, t, "float32"),
                              "float32"))
    write_gathered(path, items, meta, share=share)


def weights_items(state: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Encoder, str | None]]:
    """The items of :func:`write_gathered` for a (possibly sharded) state dict stored as it is."""
    def as_is(key: str, tensor: Tensor) -> dict[str, Tensor]:
        return {key: tensor.detach().to("cpu").contiguous()}
    return [(key, value, as_is, None) for key, value in state.items()]


def write_final_gathered(
    weights: Path | None,
    state: Mapping[str, Tensor],
    statistics: Mapping[str, Mapping[str, Tensor]],
    kinds: Mapping[str, Mapping[str, Any]],
    *,
    compression: str,
    metadata: Mapping[str, str],
    share: Share,
) -> None:
    """``final.safetensors`` (``state`` stored as it is, marked as lightning-merge's) and its sidecar, gathered tensor
    by tensor (every rank calls it, ``weights`` None except on the writer; see :func:`write_gathered`)."""
    from lightning_merge.files.ownership import marked

    write_gathered(weights, weights_items(state), marked({"format": "pt"}, {"library": "lightning-merge",
                                                                             "output": "weights"}), share=share)
    write_statistics_gathered(checkpoint_sidecar(weights) if weights is not None else None, statistics, kinds,
                              compression=compression, metadata=metadata, share=share)


def _on_writer(writer: bool, action: Callable[[], None], share: Share, what: str) -> None:
    """Run ``action`` on the writer, then raise on every rank if it failed there (collective: every rank calls it)."""
    error: BaseException | None = None
    if writer:
        try:
            action()
        except BaseException as err:  # noqa: BLE001 - shared below, raised on every rank
            error = err
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message = share(None if error is None else f"{type(error).__name__}: {error}")
        if message is not None and error is None:
            raise RuntimeError(f"writing {what} failed on rank 0: {message}")
    if error is not None:
        raise error


def write_adapter_gathered(
    folder: Path | None,
    peft_model: Any,
    adapter: str | None,
    statistics: Mapping[str, Mapping[str, Tensor]],
    kinds: Mapping[str, Mapping[str, Any]],
    *,
    keys: Mapping[str, str],
    compression: str,
    metadata: dict[str, str],
    share: Share,
) -> None:
    """:func:`~lightning_merge.formats.adapter.write_adapter` for a sharded PEFT model: the same folder
    (``adapter_model.safetensors``, the PEFT config, ``statistics.safetensors`` keyed like the adapter), its weights
    and statistics gathered tensor by tensor (:func:`write_gathered`) into a temporary sibling that rank 0 renames
    into place once complete. Every rank calls it (``folder`` None except on the writer, a local path); a failure on
    the writer makes every rank raise.

    Args:
        folder: the adapter folder (on the writer), None on the other ranks.
        peft_model: the (sharded) PEFT model.
        adapter: the adapter to write (default: the active one).
        statistics: ``{kind: {module parameter name: tensor}}`` (shards or plain tensors).
        kinds: ``{kind: metadata}``.
        keys: ``{module parameter name: adapter key}``.
        compression: the statistics' storage.
        metadata: the statistics file's metadata (also in the folder's ownership record).
        share: broadcast from rank 0 (``trainer.strategy.broadcast``).
    """
    import shutil

    from peft import get_peft_model_state_dict

    from lightning_merge.files.atomic import commit, fsync_tree, partial_path
    from lightning_merge.files.outputs import check_output_path
    from lightning_merge.files.ownership import write_record
    from lightning_merge.formats.adapter import rename_meta

    name = adapter or peft_model.active_adapter
    weights = get_peft_model_state_dict(peft_model, adapter_name=name)  # the live (sharded) tensors, PEFT's keys
    renamed = {k: {keys[n]: t for n, t in per.items() if n in keys} for k, per in statistics.items()}
    renamed = {k: v for k, v in renamed.items() if v}
    tmp = partial_path(folder) if folder is not None else None

    def prepare() -> None:
        assert folder is not None and tmp is not None
        check_output_path(folder, True, folder=True)  # an earlier adapter of this capture, or nothing
        tmp.mkdir(parents=True)

    def finish() -> None:
        assert folder is not None and tmp is not None
        peft_model.peft_config[name].save_pretrained(str(tmp))
        write_record(tmp, {"output": "adapter", "checkpoint_metadata": metadata})
        fsync_tree(tmp)
        commit(tmp, folder, replace="own")

    what = f"the adapter folder {folder}" if folder is not None else "the adapter folder"
    try:
        _on_writer(folder is not None, prepare, share, what)
        write_gathered(tmp / "adapter_model.safetensors" if tmp is not None else None, weights_items(weights),
                       {"format": "pt"}, share=share)
        if renamed:
            write_statistics_gathered(tmp / "statistics.safetensors" if tmp is not None else None, renamed,
                                      {k: rename_meta(kinds[k], keys) for k in renamed}, compression=compression,
                                      metadata=metadata, share=share)
        _on_writer(folder is not None, finish, share, what)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sharded_refusal(sharding: Sharding | None, *, fisher: bool) -> str | None:
    """Why a capture cannot run as configured on a module sharded so (None when it can), checked before training.

    Everything runs on FSDP2 (``DTensor`` shards): the batch Fisher, second moments, training-time and post-fit Gram
    matrices, the post-fit Fisher (:mod:`lightning_merge.capture.sharded_post_fit`) and PEFT adapters
    (:func:`write_adapter_gathered`). FSDP1's flat gradient shards carry no per-parameter layout for the batch Fisher.

    Args:
        sharding: how the module's parameters are sharded
            (:func:`lightning_merge.capture.sharding.sharding`: ``"fsdp1"``, ``"fsdp2"``, ``"dtensor"`` or None).
        fisher: the batch Fisher is on.
    """
    if sharding == "fsdp1" and fisher:
        return ("CurvatureCapture(fisher=True) is not supported under FSDPStrategy (FSDP1: each rank sees flat "
                "gradient shards); shard with FSDP2 instead (ModelParallelStrategy and torch.distributed.fsdp."
                "fully_shard in configure_model), or pass fisher=False to capture the second moments")
    return None


def wrap_save(strategy: Any, after: Callable[[dict, str], None]) -> None:
    """Make ``strategy.save_checkpoint(checkpoint, path)`` call ``after(checkpoint, path)`` on every rank once it
    has saved (a strategy that writes a distributed checkpoint bypasses its ``CheckpointIO``, and the gather of
    sharded statistics needs every rank). Idempotent: the latest ``after`` is called."""
    current = strategy.save_checkpoint
    inner = getattr(current, "__lightning_merge_inner__", current)

    def save_checkpoint(checkpoint: dict, filepath: Any, *args: Any, **kwargs: Any) -> None:
        inner(checkpoint, filepath, *args, **kwargs)
        after(checkpoint, str(strategy.broadcast(filepath)))

    save_checkpoint.__lightning_merge_inner__ = inner  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_checkpoint


__all__ = [
    "SHARDED_IN_MEMORY",
    "all_ranks",
    "checkpoint_sidecar",
    "fingerprints",
    "full",
    "like",
    "local",
    "shard_like",
    "sharded_refusal",
    "weights_items",
    "write_adapter_gathered",
    "write_final_gathered",
    "wrap_save",
    "write_gathered",
    "write_statistics_gathered",
]
