"""The module's weights at a fit's end as the fit-end callbacks (``MergeOnFitEnd``, ``CheckpointAveraging``,
``ContinualMerge``) see them, sharded or not.

One process or DDP: the state dict is read in memory. A sharded module (FSDP2: ``fully_shard``, as Lightning's
``ModelParallelStrategy`` applies it in ``configure_model``) holds ``DTensor`` shards: its weights are written to a
safetensors file gathered tensor by tensor (every rank takes part, rank 0 writes; a rank holds its shard plus one
full tensor), and a merged or averaged file is loaded back with each rank reading the tensors it needs from the file
and keeping its own shard. Rank 0's merge reads the files lazily, one tensor per expert at a time, so no rank ever
holds the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.callbacks._distributed import on_rank_zero
from lightning_merge.capture.sharded import shard_like, weights_items, write_gathered
from lightning_merge.capture.sharding import is_dtensor


def holds_shards(state: Mapping[str, Any]) -> bool:
    """Whether a state dict holds ``DTensor`` shards (a module sharded with FSDP2)."""
    return any(is_dtensor(v) for v in state.values())


def module_state(trainer: Any, pl_module: torch.nn.Module) -> dict[str, Tensor]:
    """The module's state dict as the fit-end callbacks read it (every rank must call it): its own ``DTensor``
    shards when it is sharded (on their devices: the gathers run on the process group's backend), else the
    strategy's full state dict (``trainer.strategy.lightning_module_state_dict()``)."""
    state = pl_module.state_dict()
    return state if holds_shards(state) else trainer.strategy.lightning_module_state_dict()


def save_weights(state: Mapping[str, Tensor] | None, path: Path | str, what: str = "weights") -> None:
    """Save an unsharded state dict as safetensors atomically (tensors sharing storage, tied weights, become copies),
    marked as an output of lightning-merge: it replaces only an earlier one (see
    :mod:`lightning_merge.files.ownership`)."""
    from lightning_merge.files.ownership import marked
    from lightning_merge.files.safetensors import save_tensors

    assert state is not None
    save_tensors(path, {key: value.detach().to("cpu") for key, value in state.items()},
                 marked({"format": "pt"}, {"library": "lightning-merge", "output": what}), replace="own")


def write_weights(trainer: Any, state: Mapping[str, Tensor], path: Path | str, what: str) -> None:
    """Write ``state`` to ``path`` on every rank's behalf (every rank must call it; a failure raises on every rank).

    Sharded: gathered tensor by tensor, rank 0 writing as the tensors come. Unsharded: rank 0 saves its copy.
    """
    if holds_shards(state):
        from lightning_merge.files.ownership import marked

        meta = marked({"format": "pt"}, {"library": "lightning-merge", "output": what})
        write_gathered(path if trainer.is_global_zero else None, weights_items(state), meta,
                       share=trainer.strategy.broadcast)
        return
    on_rank_zero(trainer, lambda: save_weights(state, path, what), f"writing the {what}")


def load_weights(pl_module: torch.nn.Module, source: Any, who: str) -> None:
    """Load every tensor of the module's state dict from ``source`` (an :class:`~lightning_merge.Expert`, read by
    this rank alone: no collective), each rank keeping its shard of a sharded parameter.

    Raises:
        ValueError: ``source`` lacks a tensor of the module, has one the module lacks, or its shape differs.
    """
    target = pl_module.state_dict()
    names = set(source.names())
    missing = [n for n in target if n not in names]
    extra = sorted(names - set(target))
    if missing or extra:
        what = f"has no tensor '{missing[0]}' ({len(missing)} missing)" if missing else \
            f"has tensor '{extra[0]}' the module lacks ({len(extra)} such)"
        raise ValueError(f"{who}: '{source.name}' {what}; it cannot be loaded into the module")
    if not holds_shards(target):
        pl_module.load_state_dict({n: source.tensor(n) for n in target}, strict=True)
        return
    with torch.no_grad():
        for name, value in target.items():
            whole = source.tensor(name)
            if tuple(whole.shape) != tuple(value.shape):
                raise ValueError(f"{who}: tensor '{name}' of '{source.name}' is {list(whole.shape)}, the module's is "
                                 f"{list(value.shape)}")
            if is_dtensor(value):
                value.to_local().copy_(shard_like(whole.to(value.dtype), value))
            else:
                value.copy_(whole)


__all__ = ["holds_shards", "load_weights", "module_state", "save_weights", "write_weights"]
