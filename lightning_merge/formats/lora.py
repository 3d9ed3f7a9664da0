"""LoRA adapters in ΔW space: reading PEFT adapter folders as a source of tensors (θ₀ + ΔW, ΔW on demand), the
weight update ΔW = s·B A, and a precision for ΔW from the statistics captured for A and B (the delta method of
ALGORITHMS.md, "LoRA statistics").

Never average A and B separately: (Σ Bᵢ)(Σ Aᵢ) has cross terms Bᵢ Aⱼ no expert learned. Merges happen on ΔW, in
float32 whatever the stored dtypes (a bf16 base plus a small ΔW rounded to bf16 would lose most of ΔW).

This module depends on the readers only (it is a source the experts module uses); the adapter *output* is a writer
(:class:`lightning_merge.engine.writers.PeftWriter`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.errors import AdapterError
from lightning_merge.files.atomic import special_file_kind
from lightning_merge.files.finite import all_finite, count_non_finite
from lightning_merge.files.safetensors import SafetensorsFile, TensorSpec
from lightning_merge.files.torch_load import load_torch_file

PEFT_PREFIX = "base_model.model."
PEFT_DEFAULTS = 8  # PEFT's LoraConfig defaults of r and lora_alpha, for a config that omits them



def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling s: α / r, or α / √r with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _as_matrices(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """A as (r, in·k…) and B as (out, r), float32: linear factors as they are, convolution factors flattened
    (B is a 1×1 convolution; ΔW[o, i, h, w] = Σᵣ B[o, r] A[r, i, h, w])."""
    a = lora_a.to(torch.float32)
    b = lora_b.to(torch.float32)
    if b.dim() > 2:
        b = b.reshape(b.shape[0], b.shape[1])
    return a.reshape(a.shape[0], -1), b


def delta_weight(lora_a: Tensor, lora_b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """ΔW = s · B A in float32, of the adapted weight's shape: (out, in) for linear layers, transposed to (in, out)
    for PEFT's ``fan_in_fan_out`` (GPT-2's Conv1D), (out, in, kh, kw…) for convolutions (groups = 1)."""
    a, b = _as_matrices(lora_a, lora_b)
    delta = (b @ a).mul_(scaling)
    if lora_a.dim() > 2:
        return delta.reshape(lora_b.shape[0], *lora_a.shape[1:])
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
        lora_a: A, shape (r, in) (convolutions: (r, in, kh, kw)).
        lora_b: B, shape (out, r) (convolutions: (out, r, 1, 1)).
        fisher_a: the precision (Fisher, or second moments) of A, same shape.
        fisher_b: the precision of B, same shape.
        scaling: s.
        floor: F = max(F, floor) before dividing.
        eps: the smallest variance.
        fan_in_fan_out: transpose to the layer's (in, out) storage.

    Returns:
        float32 tensor of ΔW's shape.
    """
    a, b = _as_matrices(lora_a, lora_b)
    fa, fb = _as_matrices(fisher_a, fisher_b)
    inv_a = 1.0 / fa.clamp(min=floor)
    inv_b = 1.0 / fb.clamp(min=floor)
    var = (b.square() @ inv_a + inv_b @ a.square()) * (scaling * scaling)
    precision = 1.0 / var.clamp(min=eps)
    if lora_a.dim() > 2:
        return precision.reshape(lora_b.shape[0], *lora_a.shape[1:])
    return precision.T.contiguous() if fan_in_fan_out else precision


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT folder, checked to be a JSON object."""
    path = folder / "adapter_config.json"
    special = special_file_kind(path)
    if special is not None:
        raise AdapterError(f"adapter '{folder}': adapter_config.json is {special}, not a file")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"'{folder}' is not a PEFT adapter folder: it has no adapter_config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(
            f"adapter '{folder}': adapter_config.json is not valid JSON ({err}); fix or re-save it"
        ) from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{folder}': adapter_config.json holds a {type(config).__name__}, not an object")
    return config


def adapter_base_path(folder: str | os.PathLike) -> Path | None:
    """The local base model an adapter names in ``base_model_name_or_path`` (None when it is not a local path)."""
    folder = Path(folder)
    guess = read_adapter_config(folder).get("base_model_name_or_path")
    if not guess or not isinstance(guess, str):
        return None
    for candidate in (Path(os.path.expanduser(guess)), folder / guess):
        if candidate.exists():
            return candidate
    return None


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) over a base model.

    Maps each adapted module to the base tensor it changes (``<module path>.weight``) with its factors and
    scaling: ``s = α/r`` (``α/√r`` with rsLoRA), with ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves them
    (the first key that matches the end of the module's name), ``fan_in_fan_out`` transposing ΔW. Full tensors the
    adapter saves (``modules_to_save``) replace the base's; with ``lora_bias`` the module's bias moves by
    ``s · lora_B.bias``.

    Args:
        folder: the adapter folder (for messages only when ``tensors`` is given).
        base_names: the base model's tensor names, to resolve module paths (with or without a leading prefix).
        base_spec: the base's ``spec(name)``, to check the factors' shapes against the weights they change.
        config: the adapter's config as a dict (default: read ``adapter_config.json``).
        tensors: the adapter's weights keyed as PEFT saves them (default: read ``adapter_model.safetensors``), for
            an adapter that lives in a ``PeftModel``.
        trust_checkpoint: allow unpickling custom objects from an ``adapter_model.bin`` (only for files you trust:
            it can run code); safetensors weights never need it.
    """

    def __init__(self, folder: str | os.PathLike, base_names: list[str], base_spec: Callable[[str], TensorSpec], *,
                 config: dict[str, Any] | None = None, tensors: Mapping[str, Tensor] | None = None,
                 trust_checkpoint: bool = False):
        self.folder = Path(folder)
        self.config = dict(config) if config is not None else read_adapter_config(self.folder)
        peft_type = self.config.get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise AdapterError(f"adapter '{self.folder}' is {peft_type}, not LoRA: only LoRA adapters can be experts")
        if self.config.get("bias", "none") != "none":
            raise AdapterError(
                f"adapter '{self.folder}' trains the base model's biases (bias={self.config['bias']!r}), which PEFT "
                "saves without their original values; only bias='none' (and lora_bias) adapters can be experts"
            )
        if self.config.get("use_dora"):
            raise AdapterError(f"adapter '{self.folder}' is a DoRA adapter (use_dora=true): not supported yet")
        check_adapter_config(self.folder, self.config)
        weights = self.folder / "adapter_model.safetensors"
        if tensors is not None:
            self._get = tensors.__getitem__
            keys = list(tensors)
            shape_of = lambda k: tuple(tensors[k].shape)  # noqa: E731
        elif weights.exists():
            file = SafetensorsFile(weights)
            self._get: Callable[[str], Tensor] = file.get
            keys = file.keys()
            shape_of = lambda k: file.spec(k).shape  # noqa: E731
        elif (self.folder / "adapter_model.bin").exists():
            data = load_torch_file(self.folder / "adapter_model.bin", trust_checkpoint)
            if not isinstance(data, dict):
                raise AdapterError(f"adapter '{self.folder}': adapter_model.bin holds no state dict")
            self._get = data.__getitem__
            keys = list(data)
            shape_of = lambda k: tuple(data[k].shape)  # noqa: E731
        else:
            raise AdapterError(f"adapter '{self.folder}' has no adapter_model.safetensors or adapter_model.bin")
        base_set = set(base_names)
        key_set = set(keys)
        self.modules: dict[str, dict[str, Any]] = {}  # base weight name -> factors' keys, rank, scaling
        self.full: dict[str, str] = {}  # base tensor name -> adapter key holding a whole tensor
        self.bias_of: dict[str, str] = {}  # base bias name -> adapted weight name (lora_bias)
        use_rslora = bool(self.config.get("use_rslora", False))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        for key in keys:
            body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if ".lora_embedding_" in body or ".lora_magnitude" in body:
                raise AdapterError(f"adapter '{self.folder}': '{key}' (embedding LoRA or DoRA) is not supported yet")
            if ".lora_B." in body:
                if (key.replace(".lora_B.", ".lora_A.").rsplit(".", 1)[0] + ".weight") not in key_set:
                    raise AdapterError(
                        f"adapter '{self.folder}': '{key}' has no matching lora_A; the file is incomplete"
                    )
                continue
            if ".lora_A." not in body:
                target = self._resolve(body, base_set)
                if target is None and body.endswith(".base_layer.weight"):
                    raise AdapterError(
                        f"adapter '{self.folder}' saves '{key}', PEFT's copy of the unadapted weight of a layer "
                        "the base does not hold under that name: a layer tied to another (an LM head tied to the "
                        "input embedding, tie_word_embeddings), whose adapter cannot be merged yet; train the "
                        "adapter without that layer in target_modules, or give a base saved untied (with its own "
                        "head weight and tie_word_embeddings: false)")
                if target is None:
                    raise AdapterError(f"adapter '{self.folder}' saves '{key}', which the base does not have")
                self.full[target] = key
                continue
            if not body.endswith(".lora_A.weight"):
                continue
            module = body.split(".lora_A.")[0]
            target = self._resolve(module + ".weight", base_set)
            if target is None:
                raise AdapterError(
                    f"adapter '{self.folder}' adapts '{module}', which the base has no '{module}.weight' for: "
                    "is it the adapter of another base?"
                )
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in key_set:
                raise AdapterError(
                    f"adapter '{self.folder}': module '{module}' has lora_A but no lora_B ('{b_key}'); the file is "
                    "incomplete"
                )
            a_shape, b_shape = shape_of(key), shape_of(b_key)
            rank = int(a_shape[0]) if len(a_shape) else 0
            if rank < 1:
                raise AdapterError(
                    f"adapter '{self.folder}': module '{module}' has lora_A of shape {list(a_shape)}, of rank 0: the "
                    "adapter holds no update for it (an empty or corrupted file); save the adapter again"
                )
            if len(b_shape) < 2 or b_shape[1] != rank:
                raise AdapterError(
                    f"adapter '{self.folder}': module '{module}' has lora_A of rank {rank} {list(a_shape)} but lora_B "
                    f"{list(b_shape)}: the ranks disagree"
                )
            configured = _pattern(self.config.get("rank_pattern") or {}, module, self.config.get("r", PEFT_DEFAULTS))
            if isinstance(configured, bool) or not isinstance(configured, int) or configured != rank:
                raise AdapterError(
                    f"adapter '{self.folder}': module '{module}' stores factors of rank {rank} but adapter_config.json "
                    f"gives it r = {configured!r} (from r and rank_pattern): PEFT would not load it, and its scaling "
                    "lora_alpha / r would be wrong; fix r or rank_pattern in adapter_config.json or re-save the adapter"
                )
            weight_shape = base_spec(target).shape
            expected = _delta_shape(a_shape, b_shape, fan_in_fan_out)
            if tuple(weight_shape) != expected:
                hint = " (a grouped convolution: not supported)" if len(a_shape) > 2 else ""
                raise AdapterError(
                    f"adapter '{self.folder}': module '{module}' gives ΔW of shape {list(expected)} but the base's "
                    f"'{target}' is {list(weight_shape)}{hint}; is it the adapter of another base?"
                )
            alpha = float(_pattern(self.config.get("alpha_pattern") or {}, module,
                                   self.config.get("lora_alpha", PEFT_DEFAULTS)))
            info = {
                "a_key": key,
                "b_key": b_key,
                "rank": rank,
                "a_shape": tuple(a_shape),
                "b_shape": tuple(b_shape),
                "alpha": alpha,
                "scaling": lora_scaling(alpha, rank, use_rslora),
                "fan_in_fan_out": fan_in_fan_out,
                "module_key": key[: key.index(".lora_A.")],
            }
            bias_key = b_key.rsplit(".", 1)[0] + ".bias"
            if bias_key in key_set:
                bias_target = target[: -len(".weight")] + ".bias"
                if bias_target not in base_set:
                    raise AdapterError(
                        f"adapter '{self.folder}': module '{module}' was trained with lora_bias but the base has no "
                        f"'{bias_target}' to add it to"
                    )
                info["bias_key"] = bias_key
                self.bias_of[bias_target] = target
            self.modules[target] = info

    def _resolve(self, name: str, base_names: set[str]) -> str | None:
        matches = _matches(name, base_names)
        if len(matches) > 1:
            raise AdapterError(
                f"adapter '{self.folder}': '{name}' matches {len(matches)} tensors of the base "
                f"({', '.join(repr(m) for m in matches[:3])}{' ...' if len(matches) > 3 else ''}), so which one it "
                "changes cannot be known; give the base the adapter was trained on (its module paths name one tensor)"
            )
        return matches[0] if matches else None

    @property
    def keys_of(self) -> dict[str, tuple[str, str]]:
        """Base weight name → the adapter keys of its (lora_A, lora_B)."""
        return {t: (info["a_key"], info["b_key"]) for t, info in self.modules.items()}

    def factors(self, target: str) -> tuple[Tensor, Tensor]:
        """``(lora_A, lora_B)`` of the base weight ``target`` as stored, checked finite (every use reads them here:
        ΔW, the precisions, and the exact adapter output, which writes them without merging a tensor)."""
        info = self.modules[target]
        factors = self._get(info["a_key"]), self._get(info["b_key"])
        for key, value in zip((info["a_key"], info["b_key"]), factors):
            if not all_finite(value):
                raise AdapterError(
                    f"adapter '{self.folder}': '{key}' has {count_non_finite(value)} NaN or infinite values (of "
                    f"{value.numel()}); the adapter is corrupted or its training diverged: leave it out"
                )
        return factors

    def delta(self, target: str) -> Tensor:
        """ΔW of the base weight ``target`` (float32)."""
        a, b = self.factors(target)
        info = self.modules[target]
        return delta_weight(a, b, info["scaling"], info["fan_in_fan_out"])

    def bias_delta(self, bias_name: str) -> Tensor:
        """The change ``s · lora_B.bias`` of a base bias under ``lora_bias`` (float32)."""
        info = self.modules[self.bias_of[bias_name]]
        return self._get(info["bias_key"]).to(torch.float32) * info["scaling"]

    def tensor(self, key: str) -> Tensor:
        return self._get(key)

    def precision(self, target: str, statistics: Any, kind: str, estimator: str | None = None) -> Tensor:
        """The delta-method precision of ΔW from the adapter's statistics of A and B."""
        a, b = self.factors(target)
        info = self.modules[target]
        fa = statistics.get(info["a_key"], kind, estimator)
        fb = statistics.get(info["b_key"], kind, estimator)
        return delta_precision(a, b, fa, fb, info["scaling"], fan_in_fan_out=info["fan_in_fan_out"])

    def describe(self) -> dict[str, Any]:
        """What ``lightning-merge inspect`` shows of an adapter: ranks, alphas, targets, base, options."""
        ranks = sorted({info["rank"] for info in self.modules.values()})
        return {
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "target_modules": self.config.get("target_modules"),
            "modules": len(self.modules),
            "adapted_parameters": sum(
                math.prod(info["a_shape"]) + math.prod(info["b_shape"])
                for info in self.modules.values()
            ),
            "modules_to_save": sorted(self.full),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "lora_bias": bool(self.bias_of),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
        }


def _delta_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, ...]:
    if len(a_shape) > 2:
        return (int(b_shape[0]), *(int(d) for d in a_shape[1:]))
    out, inp = int(b_shape[0]), int(a_shape[1])
    return (inp, out) if fan_in_fan_out else (out, inp)


def _matches(name: str, base_names: set[str]) -> list[str]:
    """The base tensors a PEFT module path may refer to: itself, or those that carry or lack a leading component
    (one is the answer; several are ambiguous)."""
    if name in base_names:
        return [name]
    return sorted(n for n in base_names if n.endswith("." + name) or name.endswith("." + n))


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup (``get_pattern_key``): the first key matching the end of the module name, the key
    grouped as PEFT groups it (an alternation ``q_proj|v_proj`` applies to the end of the name only)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(folder: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Refuse an ``adapter_config.json`` whose values would be misread: ``r`` not a positive integer, ``lora_alpha``
    not a finite number, ``alpha_pattern`` / ``rank_pattern`` not objects of valid regular expressions to numbers,
    ``use_rslora`` / ``fan_in_fan_out`` not booleans (the string ``"false"`` would read as true).

    Raises:
        AdapterError: naming the folder, the key and the value, and what PEFT expects.
    """
    from lightning_merge.files.text import brief

    where = f"adapter '{folder}': adapter_config.json"
    r = config.get("r")
    if "r" in config and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise AdapterError(f"{where} has r = {brief(r)}; the LoRA rank must be a positive integer")
    alpha = config.get("lora_alpha")
    if "lora_alpha" in config and not _is_number(alpha):
        raise AdapterError(f"{where} has lora_alpha = {brief(alpha)}; it must be a finite number (PEFT's scaling "
                           "is lora_alpha / r)")
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise AdapterError(f"{where} has {key} = {brief(config[key])}; it must be true or false")
    for key, valid, what in (("alpha_pattern", _is_number, "a finite number"),
                             ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                              "a positive integer")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise AdapterError(f"{where} has {key} = {brief(patterns)}; it must map module-name patterns to values")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?{pattern}$")
            except re.error as err:
                raise AdapterError(f"{where}: {key} key {brief(pattern)} is not a regular expression ({err})") \
                    from None
            if not valid(value):
                raise AdapterError(f"{where}: {key}[{brief(pattern)}] = {brief(value)}; it must be {what}")


class LoraSource:
    """Tensor source of an adapter expert: θ₀ + ΔW on adapted tensors (float32: ΔW is never rounded to the base's
    dtype), θ₀ elsewhere, the adapter's own tensors where it saves whole ones."""

    def __init__(self, adapter: LoraAdapter, base: Any):
        self.adapter = adapter
        self.base = base

    def keys(self) -> list[str]:
        return self.base.names()

    def spec(self, key: str) -> TensorSpec:
        return self.base.spec(key)

    def get(self, key: str) -> Tensor:
        if key in self.adapter.full:
            return self.adapter.tensor(self.adapter.full[key])
        value = self.base.tensor(key)
        if key in self.adapter.modules:
            return value.to(torch.float32) + self.adapter.delta(key)
        if key in self.adapter.bias_of:
            return value.to(torch.float32) + self.adapter.bias_delta(key)
        return value


__all__ = [
    "AdapterError",
    "LoraAdapter",
    "LoraSource",
    "PEFT_PREFIX",
    "adapter_base_path",
    "check_adapter_config",
    "delta_precision",
    "delta_weight",
    "lora_scaling",
    "read_adapter_config",
]
