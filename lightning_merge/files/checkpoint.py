"""The one writer of Lightning ``.ckpt`` files: a merge's checkpoint output, a checkpoint average, the merge of
``MergeOnFitEnd``. Each is a checkpoint dict (a template's entries, or a fresh checkpoint's) whose ``state_dict`` is
replaced and whose ``lightning_merge`` entry records what made it, written atomically (locally or to a URL) with
``torch.save``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_merge.files.remote import output_file
from lightning_merge.files.torch_load import save_torch_file

#: the entries that describe training, not weights: dropped from a checkpoint whose weights are replaced by a merge.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops")


def lightning_version() -> str:
    """The installed Lightning's version, as Lightning writes it into ``pytorch-lightning_version``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning")
    except PackageNotFoundError:
        return "2.0.0"


def new_checkpoint(epoch: int = 0, global_step: int = 0) -> dict[str, Any]:
    """The entries of a fresh checkpoint (no template): Lightning's version, ``epoch`` and ``global_step``."""
    return {"pytorch-lightning_version": lightning_version(), "epoch": epoch, "global_step": global_step}


def write_checkpoint(
    out: str | os.PathLike,
    state_dict: Mapping[str, Any],
    record: Any,
    *,
    template: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    replace: str = "never",
) -> str | Path:
    """Write a Lightning checkpoint at ``out``, atomically.

    Args:
        out: the ``.ckpt`` path, or an object-storage URL (written locally, then uploaded).
        state_dict: the checkpoint's ``state_dict`` (replaces the template's).
        record: what made the checkpoint, stored under ``"lightning_merge"`` (plain data).
        template: the checkpoint whose other entries are kept (hyper-parameters, epoch, loops...), in their order;
            None: :func:`new_checkpoint`.
        drop: template entries to leave out (e.g. :data:`TRAINING_STATE`).
        replace: what may be at ``out`` (see :func:`lightning_merge.files.atomic.commit`): ``"never"`` for a new
            output, ``"own"`` to replace an earlier output of lightning-merge.

    Returns:
        ``out``.
    """
    checkpoint = dict(template) if template is not None else new_checkpoint()
    for key in drop:
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = dict(state_dict)
    checkpoint["lightning_merge"] = record
    with output_file(out, replace=replace) as tmp:
        save_torch_file(checkpoint, tmp)
    return out


__all__ = ["TRAINING_STATE", "lightning_version", "new_checkpoint", "write_checkpoint"]
