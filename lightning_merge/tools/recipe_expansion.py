"""The size check of a recipe's values (and of ``--set`` values): YAML anchors and aliases let a few lines expand
to billions of values or to a value that contains itself, which a recipe is refused for before anything reads
it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_merge.errors import RecipeError

#: the most values a recipe may expand to: YAML anchors and aliases let a few lines name a list of billions of numbers
MAX_VALUES = 100_000


def check_expansion(value: Any, where: str, limit: int = MAX_VALUES) -> None:
    """Refuse a value (a loaded recipe, a ``--set`` value) that expands to more than ``limit`` values, or that
    contains itself: YAML aliases make both from a few lines, and reading, checking or printing one would take
    hours or the machine's memory. The count stops at the limit, so the check itself is quick.

    Raises:
        RecipeError: naming ``where`` and the key where the limit was crossed.
    """
    stack: list[tuple[Any, str, frozenset[int]]] = [(value, "", frozenset())]
    seen = 0
    while stack:
        item, key, above = stack.pop()
        seen += 1
        if seen > limit:
            raise RecipeError(f"{where}{' at ' + key if key else ''} expands to more than {limit:,} values (YAML "
                              "anchors and aliases repeating a list?); a merge takes numbers and short lists")
        if isinstance(item, (Mapping, list, tuple)):
            if id(item) in above:
                raise RecipeError(f"{where}{' at ' + key if key else ''} contains itself (a YAML alias inside its own "
                                  "anchor)")
            inner = above | {id(item)}
            pairs = item.items() if isinstance(item, Mapping) else enumerate(item)
            for k, v in pairs:
                if isinstance(item, Mapping):
                    label = f"{key}.{k}" if key else str(k)
                else:  # a list's entries: indexed when they are entries of their own (models[0]), else the list
                    label = f"{key}[{k}]" if isinstance(v, Mapping) else key
                stack.append((v, label, inner))


__all__ = ["MAX_VALUES", "check_expansion"]
