"""Adam's second moments, read from the optimizer state and named by parameter (ALGORITHMS.md, "Adam second
moments"): ``exp_avg_sq`` raw, with β₂ per parameter group and the step per parameter for bias correction.

Optimizer state is keyed by parameter index in the flattened ``param_groups`` (custom groups and filtered frozen
parameters reorder them), so each index is named through the parameter object (``id(p)`` → the module's
``named_parameters()``), never by pairing positions; under FSDP's full state dict the indices follow the wrapped
model's parameter order. Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def cpu_float(tensor: Tensor, copy: bool) -> Tensor:
    """A float32 CPU view of ``tensor`` (a copy when asked, or when it lives elsewhere or in another dtype); a sharded
    tensor (``DTensor``) stays on its device, gathered when written (:mod:`lightning_merge.capture.sharded`)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.detach().to(dtype=torch.float32, copy=copy)
    return tensor.detach().to("cpu", torch.float32, copy=copy)


def collapse(per_name: dict[str, Any]) -> Any:
    """One value when every parameter has the same (the usual case), else the per-name mapping."""
    values = set(per_name.values())
    return values.pop() if len(values) == 1 else per_name


def has_second_moments(optimizer: Any) -> bool:
    """Whether the optimizer keeps Adam-style second moments (Adam, AdamW, NAdam, RAdam...)."""
    return "betas" in getattr(optimizer, "defaults", {})


def read_second_moments(
    optimizers: Sequence[Any],
    names_by_id: Mapping[int, str],
    *,
    optimizer_states: Sequence[Mapping[str, Any]] | None = None,
    index_names: Sequence[str] | None = None,
    copy: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(exp_avg_sq by parameter name, metadata)`` of every Adam-like optimizer.

    Args:
        optimizers: the optimizers.
        names_by_id: ``id(parameter) -> name`` of the module's parameters.
        optimizer_states: the optimizers' state dicts as saved in a checkpoint (None: read them now).
        index_names: parameter names in state-index order (FSDP full state dicts re-key by index), overriding the
            naming through ``names_by_id``.
        copy: copy the tensors (False: float32 CPU views of the live state where possible).

    A parameter whose state records step 0 (created, never updated) is left out, named in the metadata's
    ``unstepped``: second moments before any update cannot be bias-corrected, and a sidecar holding them would be
    refused when merged.
    """
    values: dict[str, Tensor] = {}
    beta2: dict[str, float] = {}
    steps: dict[str, int] = {}
    unstepped: list[str] = []
    optimizers_meta = []
    for i, optimizer in enumerate(optimizers):
        if not has_second_moments(optimizer):
            continue
        state = optimizer_states[i] if optimizer_states is not None else optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        group_of = {}
        for g_index, group in enumerate(state.get("param_groups", [])):
            for idx in group["params"]:
                group_of[idx] = g_index
        for idx, entry in state.get("state", {}).items():
            if "exp_avg_sq" not in entry:
                continue
            if index_names is not None:
                name = index_names[idx] if isinstance(idx, int) and idx < len(index_names) else str(idx)
            else:
                name = names_by_id.get(id(params[idx])) if isinstance(idx, int) and idx < len(params) else None
            if name is None:
                continue
            group = state["param_groups"][group_of.get(idx, 0)]
            step = entry.get("step", 0)
            step = int(step.item() if isinstance(step, Tensor) else step)
            if step <= 0:  # state created but no update yet: nothing to bias-correct, so nothing to record
                unstepped.append(name)
                continue
            values[name] = cpu_float(entry["exp_avg_sq"], copy)
            beta2[name] = float(group["betas"][1])
            steps[name] = step
        group0 = optimizer.param_groups[0]
        optimizers_meta.append(
            {
                "class": type(optimizer).__name__,
                "lr": float(group0.get("lr", 0.0)),
                "betas": [float(b) for b in group0.get("betas", ())],
                "eps": float(group0.get("eps", 0.0)),
                "weight_decay": float(group0.get("weight_decay", 0.0)),
                "param_groups": len(optimizer.param_groups),
            }
        )
    meta: dict[str, Any] = {
        "estimator": "adam",
        "beta2": collapse(beta2),
        "step": collapse(steps),
        "optimizers": optimizers_meta,
    }
    if unstepped:
        meta["unstepped"] = sorted(unstepped)
    return values, meta


__all__ = ["collapse", "cpu_float", "has_second_moments", "read_second_moments"]
