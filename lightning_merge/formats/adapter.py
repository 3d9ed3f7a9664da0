"""PEFT adapter folders written with their statistics: ``X.adapter/`` beside a checkpoint ``X.ckpt`` and
``final.adapter/`` at fit end, as PEFT writes one (``adapter_model.safetensors``, ``adapter_config.json``) plus
``statistics.safetensors`` keyed like the adapter's weights (docs/lora.md). PEFT is imported only when a model holds
an adapter; reading adapter folders is :mod:`lightning_merge.formats.lora`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_merge.files.remote import is_url, staged
from lightning_merge.formats.sidecar import write_statistics


@dataclasses.dataclass(frozen=True)
class AdapterSnapshot:
    """A copy of a PEFT adapter, taken while training goes on.

    Attributes:
        weights: the adapter's weights on the CPU, keyed as PEFT saves them.
        config: its PEFT config (``peft_model.peft_config[name]``).
    """

    weights: dict[str, Tensor]
    config: Any


def adapter_path(checkpoint: str | os.PathLike) -> Path | str:
    """The adapter folder saved beside a checkpoint of a PEFT model: ``X.ckpt`` → ``X.adapter`` (a URL string
    for a checkpoint in object storage)."""
    if is_url(checkpoint):
        url = str(checkpoint)
        stem = url[: -len(".ckpt")] if url.endswith(".ckpt") else url
        return stem + ".adapter"
    path = Path(checkpoint)
    return path.with_name((path.name[: -len(path.suffix)] if path.suffix else path.name) + ".adapter")


def adapter_keys(peft_model: nn.Module, module: nn.Module, adapter_name: str) -> dict[str, str]:
    """``{module parameter name: adapter key}`` for the parameters of ``module`` that are the adapter's weights
    (matched by storage, so ``module`` may be any module holding the PEFT model)."""
    from peft import get_peft_model_state_dict

    by_storage = {_storage(t): key
                  for key, t in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    return {n: by_storage[_storage(p)] for n, p in module.named_parameters() if _storage(p) in by_storage}


def _storage(tensor: Tensor) -> tuple[int, tuple[int, ...]]:
    """Where a tensor's values live and its shape: a sharded tensor's (``DTensor``, FSDP2) by its local shard (a
    ``DTensor``'s own ``data_ptr`` is 0), with its global shape."""
    to_local = getattr(tensor, "to_local", None)
    inner = to_local() if callable(to_local) else tensor
    return inner.data_ptr(), tuple(tensor.shape)


def find_adapter(module: nn.Module, adapter: str | None) -> tuple[Any, dict[str, str]]:
    """The PEFT model inside ``module`` (None without one, or when PEFT was never imported) and
    ``{module parameter name: adapter key}`` of its adapter ``adapter`` (default: the active one).

    Raises:
        ValueError: ``adapter`` is named but the module holds no PEFT model, or the PEFT model has no such adapter.
    """
    if "peft" not in sys.modules:
        return None, {}
    from peft import PeftModel

    peft_model = next((m for m in module.modules() if isinstance(m, PeftModel)), None)
    if peft_model is None:
        if adapter is not None:
            raise ValueError(f"CurvatureCapture(adapter={adapter!r}): the module holds no PEFT model")
        return None, {}
    name = adapter or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"CurvatureCapture(adapter={name!r}): the PEFT model has adapters "
                         f"{', '.join(peft_model.peft_config)}")
    return peft_model, adapter_keys(peft_model, module, name)


def adapter_snapshot(peft_model: Any, adapter: str | None) -> AdapterSnapshot | None:
    """A CPU copy of the weights of ``peft_model``'s adapter ``adapter`` (default: the active one) and its config;
    None when ``peft_model`` is None (a model without PEFT)."""
    if peft_model is None:
        return None
    from peft import get_peft_model_state_dict

    name = adapter or peft_model.active_adapter
    weights = {k: v.detach().to("cpu", copy=True) for k, v in
               get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    return AdapterSnapshot(weights, peft_model.peft_config[name])


def rename_meta(meta: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """A statistic's metadata with its per-parameter values (``beta2``, ``step``, ``count``) renamed by ``keys``
    (names not in ``keys`` are left out)."""
    out = dict(meta)
    for key in ("beta2", "step", "count"):
        if isinstance(out.get(key), dict):
            out[key] = {keys[n]: v for n, v in out[key].items() if n in keys}
    return out


def write_adapter(folder: Path | str, snapshot: AdapterSnapshot, statistics: Mapping[str, Mapping[str, Tensor]],
                  kinds: Mapping[str, Mapping[str, Any]], *, keys: Mapping[str, str], compression: str,
                  metadata: dict[str, str]) -> None:
    """Write an adapter folder as PEFT writes one, with ``statistics.safetensors`` keyed like its weights; atomic.

    Args:
        folder: the folder (a URL: written locally, then uploaded with the weights last). It replaces only an
            adapter folder lightning-merge wrote (:mod:`lightning_merge.files.ownership`).
        snapshot: the adapter's weights and config.
        statistics: ``{kind: {module parameter name: tensor}}``; the parameters not in ``keys`` are left out.
        kinds: ``{kind: metadata}``.
        keys: ``{module parameter name: adapter key}``.
        compression: the statistics' storage (``"float32"``, ``"bfloat16"``, ``"rank1"``).
        metadata: the statistics file's metadata (also recorded in the folder's ownership record).
    """
    from lightning_merge.files.atomic import commit, fsync_tree, partial_path
    from lightning_merge.files.outputs import check_output_path
    from lightning_merge.files.ownership import write_record
    from lightning_merge.files.safetensors import save_tensors

    if isinstance(folder, str):  # object storage: written locally, uploaded weights last
        with staged(folder) as local:
            write_adapter(local, snapshot, statistics, kinds, keys=keys, compression=compression, metadata=metadata)
        return
    check_output_path(folder, True, folder=True)  # an earlier adapter of this capture, or nothing

    tmp = partial_path(folder)
    tmp.mkdir(parents=True)
    try:
        save_tensors(tmp / "adapter_model.safetensors", snapshot.weights, {"format": "pt"})
        snapshot.config.save_pretrained(str(tmp))
        renamed = {k: {keys[n]: t for n, t in per.items() if n in keys} for k, per in statistics.items()}
        renamed = {k: v for k, v in renamed.items() if v}
        if renamed:
            meta = {k: rename_meta(kinds[k], keys) for k in renamed}
            write_statistics(tmp / "statistics.safetensors", renamed, meta, compression=compression,
                             metadata=metadata)
        write_record(tmp, {"output": "adapter", "checkpoint_metadata": metadata})
        fsync_tree(tmp)
        commit(tmp, folder, replace="own")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["AdapterSnapshot", "adapter_keys", "adapter_path", "adapter_snapshot", "find_adapter", "rename_meta",
           "write_adapter"]
