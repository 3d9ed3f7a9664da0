"""The LoRA adapter a LightningModule trains, as experts in ΔW space: the live adapter, another run's adapter folder
or ``.ckpt``, all over the module's own base. What the callbacks (``MergeOnFitEnd``, ``CheckpointAveraging``) merge
or average when the module holds a PEFT model: never ``lora_A`` and ``lora_B`` separately, which adds cross terms
BᵢAⱼ no run learned (docs/lora.md)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_merge.formats.adapter import find_adapter
from lightning_merge.formats.lora import LoraAdapter
from lightning_merge.formats.sidecar import Statistics
from lightning_merge.sources.expert import Expert
from lightning_merge.tools.peft_models import _base_state, _plain_config


@dataclasses.dataclass(frozen=True)
class ModuleAdapter:
    """The PEFT adapter inside a LightningModule.

    Attributes:
        peft_model: the ``PeftModel`` the module holds.
        name: the adapter's name (the active one unless asked otherwise).
        keys: ``{module parameter name: adapter key}`` of its weights (keys as PEFT saves them).
        config: its ``LoraConfig`` as ``adapter_config.json`` holds it.
        base: the base model's weights, read from the live model under the base's own names.
    """

    peft_model: Any
    name: str
    keys: dict[str, str]
    config: dict[str, Any]
    base: Expert

    def outside(self, module: nn.Module) -> list[str]:
        """The module's trained parameters that are not weights of this adapter (a head outside the PEFT model,
        another adapter): a merge or average of the adapter does not carry them."""
        return [n for n, p in module.named_parameters() if p.requires_grad and n not in self.keys]


def module_adapter(module: nn.Module, adapter: str | None = None) -> ModuleAdapter | None:
    """The PEFT adapter ``module`` trains (None when it holds no ``PeftModel``).

    Raises:
        ValueError: a non-LoRA adapter.
    """
    peft_model, keys = find_adapter(module, adapter)
    if peft_model is None:
        return None
    name = adapter or peft_model.active_adapter
    config = _plain_config(peft_model.peft_config[name].to_dict())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"the module's PEFT adapter {name!r} is {config.get('peft_type')}, not LoRA: only LoRA "
                         "adapters merge in ΔW space")
    base = Expert({k: v.detach().cpu() for k, v in _base_state(peft_model).items()}, name="the PEFT model's base")
    return ModuleAdapter(peft_model, name, keys, config, base)


def live_expert(adapter: ModuleAdapter, *, name: str = "trained", statistics: Statistics | None = None) -> Expert:
    """The module's adapter as it is now, θ₀ + ΔW, with the statistics a ``CurvatureCapture`` recorded for the
    module (keyed by the module's parameter names, renamed here like the adapter's weights)."""
    from peft import get_peft_model_state_dict

    tensors = {k: v.detach().cpu() for k, v in
               get_peft_model_state_dict(adapter.peft_model, adapter_name=adapter.name).items()}
    lora = LoraAdapter(Path(f"<{name}>"), adapter.base.names(), adapter.base.spec, config=adapter.config,
                       tensors=tensors)
    stats = statistics.renamed(adapter.keys, origin=f"{statistics.origin} (adapter keys)") if statistics else None
    return Expert.from_adapter(lora, adapter.base, name=name, statistics=stats)


def checkpoint_expert(path: str | os.PathLike, adapter: ModuleAdapter, *, source: str = "state_dict",
                      trust_checkpoint: bool = False) -> Expert:
    """The adapter held in a ``.ckpt`` of a LoRA run of this module (its ``lora_A`` / ``lora_B`` under the module's
    names, read with the module's ``LoraConfig``), with the checkpoint's sidecar renamed like the adapter's weights.

    Args:
        path: the checkpoint.
        adapter: the module's adapter (names, config, base).
        source: ``"state_dict"``, or ``"current_model_state"`` for the raw weights a checkpoint written with
            Lightning's ``WeightAveraging`` keeps beside its running average.
        trust_checkpoint: see :class:`~lightning_merge.Expert`.

    Raises:
        ValueError: the checkpoint lacks a weight of the adapter (not a checkpoint of this LoRA module).
    """
    from lightning_merge.formats.sidecar import find_sidecar

    expert = Expert(path, trust_checkpoint=trust_checkpoint)
    stats = expert.statistics
    if source == "current_model_state":
        from lightning_merge.files.torch_load import load_torch_file

        ckpt = load_torch_file(Path(path), trust_checkpoint)
        if "current_model_state" not in ckpt:
            raise ValueError(f"checkpoint '{path}' has no 'current_model_state' (it was not saved with "
                             "WeightAveraging)")
        sidecar = find_sidecar(Path(path))
        expert = Expert(dict(ckpt["current_model_state"]), name=str(path),
                        statistics=str(sidecar) if sidecar is not None else None)
        stats = expert.statistics
    missing = [n for n in adapter.keys if n not in expert]
    if missing:
        raise ValueError(
            f"checkpoint '{path}' has no '{missing[0]}' (of the {len(adapter.keys)} weights of the module's LoRA "
            f"adapter {adapter.name!r}, {len(missing)} are missing): it is not a checkpoint of this LoRA module; give "
            "a checkpoint of the same LightningModule and LoraConfig, or the run's adapter folder"
        )
    tensors = {key: expert.tensor(n) for n, key in adapter.keys.items()}
    lora = LoraAdapter(Path(str(path)), adapter.base.names(), adapter.base.spec, config=adapter.config,
                       tensors=tensors)
    renamed = stats.renamed(adapter.keys, origin=f"{stats.origin} (adapter keys)") if stats is not None else None
    return Expert.from_adapter(lora, adapter.base, name=str(path), statistics=renamed)


def adapter_expert(path: str | os.PathLike, adapter: ModuleAdapter, who: str, *, source: str = "state_dict") -> Expert:
    """Another run's adapter as an expert over the module's base: an adapter folder (``X.adapter/`` written by
    ``CurvatureCapture``, a PEFT ``save_pretrained`` folder; its ``statistics.safetensors`` read) or a ``.ckpt``
    of a LoRA run of this module.

    Raises:
        ValueError: anything else (a full model), naming why it cannot be merged in ΔW space.
    """
    local = Path(path)
    if local.is_dir() and (local / "adapter_config.json").is_file():
        return Expert(local, base=adapter.base, name=str(path))
    if local.suffix == ".ckpt":
        return checkpoint_expert(local, adapter, source=source)
    raise ValueError(
        f"{who}: expert '{path}' is neither a LoRA adapter folder (with adapter_config.json) nor a .ckpt of a LoRA "
        "run of this module; the module trains a LoRA adapter, so the merge happens in ΔW space (ΔW = s·B A of each "
        "adapter, over the module's base), and a full model is no adapter: give the other runs' adapter folders "
        "(X.adapter/ beside their checkpoints, final.adapter/) or their .ckpt files"
    )


def load_adapter(adapter: ModuleAdapter, folder: str | os.PathLike, name: str) -> None:
    """Load the adapter folder ``folder`` into the module's ``PeftModel`` as adapter ``name`` (replacing an adapter
    of that name) and make it the active one, so the module's forward uses it (``trainer.test`` sees it)."""
    model = adapter.peft_model
    if name in model.peft_config:
        if model.active_adapter == name:
            model.set_adapter(adapter.name)
        model.delete_adapter(name)
    device = next(model.parameters()).device
    model.load_adapter(str(folder), adapter_name=name, torch_device=str(device))
    model.set_adapter(name)


__all__ = ["ModuleAdapter", "adapter_expert", "checkpoint_expert", "live_expert", "load_adapter", "module_adapter"]
