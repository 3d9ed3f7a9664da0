"""Merging adapters inside a live ``PeftModel`` into a new named adapter, with any strategy: the shape PEFT users
know from ``add_weighted_adapter``, on this project's engine (every strategy, exact or SVD adapters, curvature).

Example::

    from lightning_merge import Ties
    from lightning_merge.tools.peft_models import add_merged_adapter

    model = PeftModel.from_pretrained(base, "adapters/math", adapter_name="math")
    model.load_adapter("adapters/code", adapter_name="code")
    add_merged_adapter(model, ["math", "code"], "merged", Ties(density=0.5), rank=16)
    model.set_adapter("merged")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_merge.engine.run import merge
from lightning_merge.formats.lora import LoraAdapter
from lightning_merge.formats.sidecar import Statistics
from lightning_merge.sources.expert import Expert
from lightning_merge.strategies.base import Strategy


def _base_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The base model's weights as its own ``state_dict`` names them, read from the live model (no copy): LoRA
    layers' ``base_layer`` tensors under the layer's name, ``modules_to_save`` originals, no adapter weights."""
    base = peft_model.get_base_model()
    state: dict[str, Tensor] = {}
    for name, tensor in base.state_dict(keep_vars=False).items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[clean] = tensor.detach()
    return state


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A PEFT config dict as JSON holds it (sets as sorted lists, enums as their values), as PEFT saves it."""
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


def add_merged_adapter(
    peft_model: nn.Module,
    adapters: Sequence[str | os.PathLike],
    adapter_name: str,
    strategy: Strategy,
    *,
    rank: int | None = None,
    statistics: Mapping[str, str | os.PathLike | Statistics | Mapping[str, Any]] | None = None,
    on_missing_statistic: str = "error",
) -> nn.Module:
    """Merge adapters of a ``PeftModel`` with ``strategy`` and add the result as a new adapter.

    Args:
        peft_model: the ``PeftModel`` holding the adapters.
        adapters: the adapters to merge, in order (the strategy's per-expert lists follow it): names of adapters
            the ``PeftModel`` holds, or adapter folders (``adapter_config.json``, ``adapter_model.safetensors``),
            read from disk against the model's base without being loaded into it. A folder's
            ``statistics.safetensors`` (what ``CurvatureCapture`` writes into ``final.adapter``) is read for
            curvature strategies without ``statistics``.
        adapter_name: the name of the new adapter (must not exist yet).
        strategy: any strategy; a strategy linear in the experts gives the exact adapter (rank Σrᵢ) without
            ``rank``, any other needs ``rank``.
        rank: None for the exact concatenation, else the rank of a truncated SVD of each merged module.
        statistics: ``{adapter name or folder: sidecar path, Statistics or mapping}`` for curvature strategies,
            keyed like the adapter's weights (``CurvatureCapture.save_adapter_statistics`` writes such a file);
            an adapter given as a folder defaults to the ``statistics.safetensors`` inside it.
        on_missing_statistic: ``"error"`` or ``"uniform"`` (see :func:`lightning_merge.merge`).

    Returns:
        The same ``PeftModel``, with ``adapter_name`` added (not activated: call ``set_adapter``).

    Raises:
        ValueError: an unknown or existing adapter name, a non-LoRA adapter, or what :func:`lightning_merge.merge`
            refuses for adapter outputs.
    """
    from peft import get_peft_model_state_dict

    configs = getattr(peft_model, "peft_config", None)
    if configs is None:
        raise ValueError(f"add_merged_adapter needs a peft.PeftModel, got {type(peft_model).__name__}")
    def is_folder(entry: Any) -> bool:
        return (not isinstance(entry, str) or entry not in configs) and Path(entry, "adapter_config.json").is_file()

    unknown = [a for a in adapters if not is_folder(a) and a not in configs]
    if unknown:
        raise ValueError(f"the PeftModel has no adapter {unknown[0]!r} and it is no adapter folder (a folder holding "
                         f"adapter_config.json); the model has {', '.join(configs)}")
    if adapter_name in configs:
        raise ValueError(f"the PeftModel already has an adapter {adapter_name!r}; choose another name")
    base_state = _base_state(peft_model)
    base = Expert(base_state, name="PeftModel base")
    statistics = {str(k): v for k, v in (statistics or {}).items()}
    experts = []
    for name in adapters:
        if is_folder(name):  # read from disk with its statistics.safetensors, if any
            experts.append(Expert(name, base=base, statistics=statistics.get(str(name))))
            continue
        if strategy.requires and name not in statistics:
            raise ValueError(
                f"{type(strategy).__name__} reads {', '.join(strategy.requires)} statistics, and the PeftModel's "
                f"adapter {name!r} carries none: give its folder instead of its name (its statistics.safetensors is "
                "read), or "
                f"pass statistics={{{name!r}: 'FOLDER/statistics.safetensors'}}"
            )
        config = _plain_config(configs[name].to_dict())
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"adapter {name!r} is {config.get('peft_type')}, not LoRA")
        tensors = {k: v.detach() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        adapter = LoraAdapter(Path(f"<PeftModel adapter {name}>"), base.names(), base.spec, config=config,
                              tensors=tensors)
        experts.append(Expert.from_adapter(adapter, base, name=name,
                                           statistics=statistics.get(name)))
    folder = Path(tempfile.mkdtemp(prefix="lightning-merge-adapter-"))
    try:
        merge(experts, base, strategy, out=folder / "adapter", output="peft", rank=rank,
              on_missing_statistic=on_missing_statistic)
        peft_model.load_adapter(str(folder / "adapter"), adapter_name=adapter_name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return peft_model


__all__ = ["add_merged_adapter"]
