"""mergekit's geometric methods in a recipe: their rows of the recipe table (:mod:`lightning_merge.tools.recipe`)
and their arguments, read under mergekit's own parameter names with mergekit's defaults and requirements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief
from lightning_merge.strategies import ArceeFusion, Karcher, ModelStock, MultiSlerp, NearSwap, NuSlerp, Slerp

# mergekit method → (class, fixed arguments, default normalize (unused), per-model parameters, shared parameters),
# the rows of recipe._MERGEKIT
GEOMETRIC: dict[str, tuple[type, dict[str, Any], None, tuple[str, ...], tuple[str, ...]]] = {
    "slerp": (Slerp, {}, None, (), ("t",)),
    "nuslerp": (NuSlerp, {}, None, ("weight",), ("nuslerp_flatten", "nuslerp_row_wise")),
    "multislerp": (MultiSlerp, {}, None, ("weight",), ("normalize_weights", "eps")),
    "karcher": (Karcher, {}, None, (), ("max_iter", "tol")),
    "model_stock": (ModelStock, {}, None, (), ("filter_wise",)),
    "nearswap": (NearSwap, {}, None, (), ("t",)),
    "arcee_fusion": (ArceeFusion, {}, None, (), ()),
}
#: methods whose inputs include the base model when one is given (mergekit's karcher ignores the base's role and
#: averages it with the models; it is added to them when the recipe does not list it)
INCLUDES_BASE = frozenset({"karcher"})
#: parameters mergekit requires (no default there): a recipe without them is refused, as mergekit refuses it
_REQUIRED = {"slerp": ("t",), "nearswap": ("t",)}
_BOOLEANS = ("nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "filter_wise")
_INTEGERS = ("max_iter",)


def geometric_arguments(method: str, shared: Mapping[str, Any], per_expert: Callable[[str, float | None], list],
                        recipe: Path) -> dict[str, Any]:
    """The strategy arguments of a geometric mergekit method from a recipe's parameters.

    Args:
        method: the mergekit method name (a key of :data:`GEOMETRIC`).
        shared: the recipe's ``parameters`` this method takes.
        per_expert: ``per_expert(key, default)``: each model's value of a per-model parameter (the recipe's checks).
        recipe: the recipe's path, for messages.

    Raises:
        RecipeError: a required parameter missing, or a value of the wrong type.
    """
    _, _, _, model_params, shared_params = GEOMETRIC[method]
    for key in _REQUIRED.get(method, ()):
        if key not in shared:
            raise RecipeError(f"{recipe}: merge_method '{method}' needs parameters.{key} (mergekit requires it)")
    arguments: dict[str, Any] = {}
    if "weight" in model_params:  # mergekit requires every model's weight for nuslerp and multislerp
        arguments["weights"] = per_expert("weight", None)
    for key in shared_params:
        if key not in shared:
            continue
        value = shared[key]
        where = f"{recipe}: parameters.{key}"
        if key in _BOOLEANS:
            if not isinstance(value, bool):
                raise RecipeError(f"{where} must be true or false, got {brief(value)}")
        elif key in _INTEGERS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(f"{where} must be an integer, got {brief(value)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {brief(value)}")
        else:
            value = float(value)
        arguments[key] = value
    return arguments


__all__ = ["GEOMETRIC", "INCLUDES_BASE", "geometric_arguments"]
