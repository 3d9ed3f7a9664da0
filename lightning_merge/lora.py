"""LoRA adapters in ΔW space: the weight update ΔW = s·B A of an adapter, and a precision for ΔW from the
statistics captured for A and B (the delta method of ALGORITHMS.md, "LoRA statistics").

Never average A and B separately: (Σ Bᵢ)(Σ Aᵢ) has cross terms Bᵢ Aⱼ no expert learned. Merges happen on ΔW.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling s: α / r, or α / √r with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def delta_weight(lora_a: Tensor, lora_b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """ΔW = s · B A (transposed when the layer stores weights as (in, out), PEFT's ``fan_in_fan_out``)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return delta.T.contiguous() if fan_in_fan_out else delta


def delta_precision(
    lora_a: Tensor,
    lora_b: Tensor,
    fisher_a: Tensor,
    fisher_b: Tensor,
    scaling: float,
    *,
    floor: float = 1e-12,
    eps: float = 1e-30,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """A precision (inverse variance) for each entry of ΔW = s·B A from precisions of A and B.

    With independent Gaussian posteriors of precisions F_A, F_B (floored at ``floor``), the delta method gives
    Var(ΔWⱼₖ) ≈ s² Σᵣ (Bⱼᵣ² / F_A[r, k] + A_rₖ² / F_B[j, r]), computed as two matrix products:
    ``s² (B² @ (1/F_A) + (1/F_B) @ A²)``. The precision is 1 / max(Var, eps) (Var is 0 where row Bⱼ· and column
    A·ₖ are both zero: the adapter did not touch that entry, and the precision is then 1/eps, very large; callers
    merging several adapters see the entries other adapters moved weighted by theirs).

    Args:
        lora_a: A, shape (r, in).
        lora_b: B, shape (out, r).
        fisher_a: the precision (Fisher, or second moments) of A, same shape.
        fisher_b: the precision of B, same shape.
        scaling: s.
        floor: F = max(F, floor) before dividing.
        eps: the smallest variance.
        fan_in_fan_out: transpose to the layer's (in, out) storage.

    Returns:
        float32 tensor of ΔW's shape.
    """
    a, b = lora_a.float(), lora_b.float()
    inv_a = 1.0 / fisher_a.float().clamp(min=floor)
    inv_b = 1.0 / fisher_b.float().clamp(min=floor)
    var = (b.square() @ inv_a + inv_b @ a.square()) * (scaling * scaling)
    precision = 1.0 / var.clamp(min=eps)
    return precision.T.contiguous() if fan_in_fan_out else precision


# -- PEFT adapter folders as experts ---------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) over a base model.

    Maps each adapted module to the base tensor it changes (``<module path>.weight``) with its factors and
    scaling: ``s = α/r`` (``α/√r`` with rsLoRA), with ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves them
    (the first key that matches the end of the module's name), ``fan_in_fan_out`` transposing ΔW. Full tensors the
    adapter saves (``modules_to_save``) replace the base's.

    Args:
        folder: the adapter folder.
        base_names: the base model's tensor names, to resolve module paths (with or without a leading prefix).
    """

    def __init__(self, folder: str | os.PathLike, base_names: list[str]):
        from lightning_merge.experts import SafetensorsFile, load_torch_file

        self.folder = Path(folder)
        self.config = json.loads((self.folder / "adapter_config.json").read_text())
        peft_type = self.config.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter '{self.folder}' is {peft_type}, not LoRA: only LoRA adapters can be experts")
        if self.config.get("bias", "none") != "none":
            raise ValueError(f"adapter '{self.folder}' trains biases (bias={self.config['bias']!r}): not supported yet")
        weights = self.folder / "adapter_model.safetensors"
        if weights.exists():
            file = SafetensorsFile(weights)
            self._get = file.get
            keys = file.keys()
        elif (self.folder / "adapter_model.bin").exists():
            data = load_torch_file(self.folder / "adapter_model.bin")
            self._get = data.__getitem__
            keys = list(data)
        else:
            raise FileNotFoundError(f"adapter '{self.folder}' has no adapter_model.safetensors or adapter_model.bin")
        base_set = set(base_names)
        self.modules: dict[str, dict[str, Any]] = {}  # base tensor name -> factors and scaling
        self.full: dict[str, str] = {}  # base tensor name -> adapter key holding a whole tensor
        self.keys_of: dict[str, tuple[str, str]] = {}
        for key in keys:
            body = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_embedding_" in body or ".lora_magnitude" in body:
                raise ValueError(f"adapter '{self.folder}': '{key}' (embedding LoRA or DoRA) is not supported yet")
            if ".lora_A." in body or body.endswith(".lora_A.weight"):
                module = body.split(".lora_A.")[0]
                target = _resolve(module + ".weight", base_set)
                if target is None:
                    raise ValueError(
                        f"adapter '{self.folder}' adapts '{module}', which the base has no '{module}.weight' for: "
                        "is it the adapter of another base?"
                    )
                b_key = key.replace(".lora_A.", ".lora_B.")
                self.keys_of[target] = (key, b_key)
            elif ".lora_B." in body:
                continue
            else:
                target = _resolve(body, base_set)
                if target is None:
                    raise ValueError(f"adapter '{self.folder}' saves '{key}', which the base does not have")
                self.full[target] = key
        use_rslora = bool(self.config.get("use_rslora", False))
        for target, (a_key, _) in self.keys_of.items():
            module = target[: -len(".weight")]
            rank = int(self._shape(a_key)[0])
            alpha = float(_pattern(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", rank)))
            self.modules[target] = {
                "rank": rank,
                "alpha": alpha,
                "scaling": lora_scaling(alpha, rank, use_rslora),
                "fan_in_fan_out": bool(self.config.get("fan_in_fan_out", False)),
            }

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._get(key).shape)

    def factors(self, target: str) -> tuple[Tensor, Tensor]:
        a_key, b_key = self.keys_of[target]
        return self._get(a_key), self._get(b_key)

    def delta(self, target: str) -> Tensor:
        """ΔW of the base tensor ``target`` (float32)."""
        a, b = self.factors(target)
        info = self.modules[target]
        return delta_weight(a, b, info["scaling"], info["fan_in_fan_out"])

    def precision(self, target: str, statistics: Any, kind: str, estimator: str | None = None) -> Tensor:
        """The delta-method precision of ΔW from the adapter's statistics of A and B."""
        a, b = self.factors(target)
        a_key, b_key = self.keys_of[target]
        fa = statistics.get(a_key, kind, estimator)
        fb = statistics.get(b_key, kind, estimator)
        info = self.modules[target]
        return delta_precision(a, b, fa, fb, info["scaling"], fan_in_fan_out=info["fan_in_fan_out"])


def _resolve(name: str, base_names: set[str]) -> str | None:
    """The base tensor a PEFT module path refers to (exact, or the base carries/lacks a leading component)."""
    if name in base_names:
        return name
    matches = [n for n in base_names if n.endswith("." + name) or name.endswith("." + n)]
    return matches[0] if len(matches) == 1 else None


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraSource:
    """Tensor source of an adapter expert: θ₀ + ΔW on adapted tensors, θ₀ elsewhere (computed on demand)."""

    def __init__(self, adapter: LoraAdapter, base: Any):
        self.adapter = adapter
        self.base = base

    def keys(self) -> list[str]:
        return self.base.names()

    def spec(self, key: str) -> Any:
        return self.base.spec(key)

    def get(self, key: str) -> Tensor:
        if key in self.adapter.full:
            return self.adapter._get(self.adapter.full[key])
        value = self.base.tensor(key)
        if key in self.adapter.modules:
            return (value.to(torch.float32) + self.adapter.delta(key)).to(value.dtype)
        return value


__all__ = ["LoraAdapter", "LoraSource", "delta_precision", "delta_weight", "lora_scaling"]


def merge_to_peft(
    experts: list[Any],
    base: Any,
    strategy: Any,
    out: Path,
    *,
    rank: int | None = None,
    overwrite: bool = False,
    on_missing_statistic: str = "error",
) -> Path:
    """Merge LoRA experts and write a PEFT adapter folder (see :func:`lightning_merge.merge`, ``output="peft"``).

    Exact mode (``rank=None``; Linear and TaskArithmetic): ΔW = Σ cᵢ sᵢ Bᵢ Aᵢ is written as the concatenated factors
    A = [A₁; …; A_N], B = [c₁s₁B₁, …, c_Ns_NB_N] (rank Σrᵢ per module, scaling 1). Otherwise the merged ΔW of each
    module (θ_merged − θ₀) is factored by a truncated SVD at ``rank``: B = U√Σ, A = √Σ Vᵀ; the relative
    reconstruction error ‖ΔW − BA‖/‖ΔW‖ per module goes into ``lightning_merge.json``.
    """
    from safetensors.torch import save_file

    from lightning_merge.engine import merge
    from lightning_merge.experts import as_expert
    from lightning_merge.io import replace_dir
    from lightning_merge.strategies.linear import Linear, TaskArithmetic
    from lightning_merge.writers import check_output_path

    if any(e.lora is None for e in experts):
        plain = next(e.name for e in experts if e.lora is None)
        raise ValueError(f"output='peft' needs LoRA adapter experts; '{plain}' is not one")
    if base is None:
        raise ValueError("output='peft' needs base= the model the adapters adapt")
    check_output_path(out, overwrite)
    base_expert = as_expert(base, "base")
    adapters = [e.lora for e in experts]
    fan = {a.modules[t]["fan_in_fan_out"] for a in adapters for t in a.modules}
    if len(fan) > 1:
        raise ValueError("the adapters disagree on fan_in_fan_out; they cannot share one adapter")
    fan_in_fan_out = fan.pop() if fan else False
    targets = sorted({t for a in adapters for t in a.modules})
    module_key = {}
    for a in adapters:
        for t, (a_key, _) in a.keys_of.items():
            module_key.setdefault(t, a_key[: a_key.index(".lora_A.")])
    exact = rank is None
    linear = type(strategy) is Linear or (type(strategy) is TaskArithmetic and strategy.weighting is None)
    if exact and not linear:
        raise ValueError(
            f"strategy {strategy.name!r} is not linear in the task vectors: pass rank= for a truncated-SVD adapter"
        )
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    if exact:
        n = len(adapters)
        weights = strategy._weights(n)
        if isinstance(strategy, Linear):
            coeffs = (weights / weights.sum()).tolist() if strategy.normalize else weights.tolist()
        else:
            coeffs = (
                (weights * strategy.scale).tolist()
                if not strategy.normalize
                else (weights / weights.sum() * strategy.scale).tolist()
            )
        for t in targets:
            a_parts, b_parts = [], []
            for c, adapter in zip(coeffs, adapters):
                if t not in adapter.modules:
                    continue
                a, b = adapter.factors(t)
                a_parts.append(a.float())
                b_parts.append(b.float() * (c * adapter.modules[t]["scaling"]))
            tensors[f"{module_key[t]}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
            tensors[f"{module_key[t]}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
            ranks[t] = sum(p.shape[0] for p in a_parts)
    else:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        # Only the adapted tensors: a view of the base restricted to them keeps memory to those tensors.
        merged = merge(
            [e.subset(targets) for e in experts],
            base=base_expert.subset(targets),
            strategy=strategy,
            on_missing_statistic=on_missing_statistic,
        )
        for t in targets:
            delta = merged[t].to(torch.float32) - base_expert.tensor(t).to(torch.float32)
            m = delta.T if fan_in_fan_out else delta
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            k = min(rank, s.numel())
            root = s[:k].sqrt()
            b = (u[:, :k] * root).contiguous()
            a = (root.unsqueeze(1) * vh[:k]).contiguous()
            norm = float(m.norm())
            errors[t[: -len(".weight")]] = float((m - b @ a).norm()) / norm if norm > 0 else 0.0
            tensors[f"{module_key[t]}.lora_A.weight"] = a
            tensors[f"{module_key[t]}.lora_B.weight"] = b
            ranks[t] = k
    config = dict(adapters[0].config)
    top = max(ranks.values())
    modules = {
        t: module_key[t][len(_PEFT_PREFIX) :] if module_key[t].startswith(_PEFT_PREFIX) else module_key[t]
        for t in targets
    }
    config.update(
        {
            "r": top,
            "lora_alpha": top,
            "rank_pattern": {re.escape(modules[t]): ranks[t] for t in targets if ranks[t] != top},
            "alpha_pattern": {re.escape(modules[t]): ranks[t] for t in targets if ranks[t] != top},
            "target_modules": sorted(modules.values()),
            "use_rslora": False,
            "fan_in_fan_out": fan_in_fan_out,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
        }
    )
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "lightning_merge.json").write_text(
        json.dumps(
            {
                "strategy": strategy.to_dict(),
                "experts": [e.name for e in experts],
                "mode": "concatenated factors (exact)" if exact else f"truncated SVD at rank {rank}",
                "ranks": {t[: -len(".weight")]: r for t, r in ranks.items()},
                "relative_error": errors,
            },
            indent=2,
        )
    )
    replace_dir(tmp, out)
    return out
