"""mergekit's parameter settings that vary over the model, resolved per tensor exactly as mergekit 0.1.5 resolves them
(``mergekit/config.py: evaluate_setting``, ``parameter_resolver.py``, ``plan.py``):

- a **setting** is a value (number, boolean, text), a **gradient** (a list of values), a rule
  ``{filter: TEXT, value: VALUE or GRADIENT}``, or a list of rules;
- rules: the first whose filter is absent, ``"*"`` or a substring of the tensor's name gives the value; when none
  does, the parameter falls back to the next scope (a model's ``parameters`` → the recipe's ``parameters`` → the
  method's default);
- gradients: a tensor of layer ``i`` of a model of ``L`` layers sits at ``t = i / (L − 1)`` (``t = 1`` when
  ``L = 1``); every other tensor (embeddings, final norm, head) at ``t = 0``. With ``s = t·(n − 1)``,
  ``i0 = int(s)``, ``i1 = min(n − 1, i0 + 1)``: ``(1 − (s − i0))·v[i0] + (s − i0)·v[i1]`` for numbers, ``v[int(s)]``
  for booleans and text. ``L`` is the model's ``num_hidden_layers`` (its ``config.json``), else the largest layer
  index in its tensor names + 1; a tensor's layer is the first integer component of its name
  (``model.layers.7.mlp.up_proj.weight`` → 7).

:func:`resolve` gives the plain values of one tensor; the recipe builds that tensor's strategy from them with the
same code as for plain values, and :class:`~lightning_merge.strategies.PerTensor` merges each tensor with its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief
from lightning_merge.strategies import functional as F

_PLAIN = (bool, int, float, str)


def varies(setting: Any) -> bool:
    """Whether a setting can differ between tensors (a gradient or filter rules)."""
    return isinstance(setting, (list, tuple, Mapping))


def check_setting(value: Any, recipe: Path, where: str) -> None:
    """Refuse what mergekit's ``ParameterSetting`` does not accept, and empty lists (which mergekit reads as "not
    set here" in one place and fails on in another).

    Raises:
        RecipeError: naming the recipe and the key.
    """
    if isinstance(value, _PLAIN) or value is None:
        return
    if isinstance(value, Mapping):
        value = [value]
        single = True
    else:
        single = False
    if not isinstance(value, (list, tuple)):
        raise RecipeError(f"{recipe}: {where} must be a value, a list of values (a per-layer gradient) or filter "
                          f"rules ({{filter: ..., value: ...}}), got {brief(value)}")
    if not value:
        raise RecipeError(f"{recipe}: {where} is an empty list; give a value, a gradient or filter rules")
    if not single and all(isinstance(v, _PLAIN) for v in value):
        return
    for k, rule in enumerate(value):
        at = where if single else f"{where}[{k}]"
        if not isinstance(rule, Mapping) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise RecipeError(f"{recipe}: {at} must be a rule {{filter: TEXT, value: ...}} (a list mixes rules and "
                              f"values only as mergekit allows: all values, or all rules), got {brief(rule)}")
        if rule.get("filter") is not None and not isinstance(rule["filter"], str):
            raise RecipeError(f"{recipe}: {at}.filter must be text (a part of tensor names), got "
                              f"{brief(rule['filter'])}")
        inner = rule["value"]
        if isinstance(inner, (list, tuple)):
            if not inner or not all(isinstance(v, _PLAIN) for v in inner):
                raise RecipeError(f"{recipe}: {at}.value must be a value or a non-empty list of values, got "
                                  f"{brief(inner)}")
        elif not isinstance(inner, _PLAIN):
            raise RecipeError(f"{recipe}: {at}.value must be a value or a list of values, got {brief(inner)}")


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of a setting at tensor ``name`` and layer position ``t``; None when no rule's filter matches
    (mergekit's ``evaluate_setting``)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, _PLAIN) or setting is None:
        return setting
    if all(isinstance(v, _PLAIN) for v in setting):
        return interpolate(list(setting), t)
    for rule in setting:
        filt = rule.get("filter")
        if filt is None or filt == "*" or (name and filt in name):
            value = rule["value"]
            return interpolate(list(value), t) if isinstance(value, (list, tuple)) else value
    return None


def interpolate(values: Sequence[Any], t: float) -> Any:
    """A gradient's value at ``t``, with mergekit's arithmetic (numbers interpolate; other values are picked)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_position(name: str, layers: int | None) -> float:
    """mergekit's ``t`` of tensor ``name`` in a model of ``layers`` layers."""
    index = F.block_index(name)
    if index is None or layers is None:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


def count_layers(model: Path | None, names: Iterable[str]) -> int | None:
    """The number of layers gradients interpolate over: ``num_hidden_layers`` of the model's ``config.json`` when
    it has one (mergekit's count), else the largest layer index in ``names`` + 1 (None: no layer)."""
    if model is not None and model.is_dir() and (model / "config.json").is_file():
        try:
            config = json.loads((model / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        layers = config.get("num_hidden_layers") if isinstance(config, Mapping) else None
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
            return layers
    found = [i for i in (F.block_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else None


def resolve(shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], name: str, t: float
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plain parameters of tensor ``name``: settings whose rules do not match it are left out, so the next
    scope's value (a model's → the recipe's → the default) applies, as in mergekit."""
    def plain(settings: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, setting in settings.items():
            value = evaluate(setting, name, t)
            if value is not None:
                out[key] = value
        return out

    return plain(shared), [plain(p) for p in per_model]


__all__ = ["check_setting", "count_layers", "evaluate", "interpolate", "layer_position", "resolve", "varies"]
