"""The strategy registry: every strategy by its name (the name recipes, ``--set``, the continual journal and
``Strategy.from_dict`` use), each with the published method it implements.

A strategy class with a ``name`` registers itself when it is defined (``Strategy.__init_subclass__`` calls
:func:`register`); a second class under a name already taken is refused, so a name always means one class.
Lookups (:func:`lookup`, :func:`by_class_path`) name the known strategies when they fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lightning_merge.files.text import brief

#: mergekit's implementations of its merge methods (linear, and the generalized task arithmetic of task arithmetic,
#: TIES, DARE and Breadcrumbs)
MERGEKIT = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/"
#: FusionBench's implementations (the parity references of OPCM, RegMean, TSV-M, TALL masks, ISO-C, ISO-CTS and WUDI)
FUSION_BENCH = "https://github.com/tanganke/fusion_bench/tree/main/fusion_bench/method/"


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where a merge method comes from: what a strategy implements, and what its parity tests compare against.

    Attributes:
        paper: the URL of the paper that defines the method.
        code: URLs of reference implementations (the authors' repository, mergekit's or FusionBench's), if any.
    """

    paper: str
    code: tuple[str, ...] = ()


_REGISTRY: dict[str, type[Any]] = {}

#: name → strategy class, every registered strategy (read-only: classes register themselves by their ``name``)
STRATEGIES: Mapping[str, type[Any]] = MappingProxyType(_REGISTRY)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type[Any]) -> type[Any]:
    """Register a strategy class under its ``name``.

    Defining the same class again (a reloaded module, a re-run notebook cell: the same module and qualified name)
    replaces the earlier definition.

    Args:
        cls: a :class:`~lightning_merge.strategies.Strategy` subclass whose ``name`` is a non-empty string.

    Returns:
        ``cls``.

    Raises:
        ValueError: the name is empty, or another class is registered under it (naming both classes).
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_qualified(cls)} has no name to register under: give it name = '...' (its recipe name)")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and _qualified(existing) != _qualified(cls):
        raise ValueError(
            f"strategy name {name!r} of {_qualified(cls)} is already taken by {_qualified(existing)}: give the new "
            "class another name"
        )
    _REGISTRY[name] = cls
    return cls


def names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def lookup(name: object) -> type[Any]:
    """The strategy class registered under ``name``.

    Raises:
        ValueError: no strategy has that name (the message lists the known ones).
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown strategy {brief(name)}; known strategies: {', '.join(names())}")
    return cls


def by_class_path(path: str) -> type[Any]:
    """The registered class that LightningCLI's ``class_path`` names: its full path, or its class name alone.

    Raises:
        ValueError: no registered class matches (the message lists the known class names).
    """
    short = path.rsplit(".", 1)[-1]
    for cls in _REGISTRY.values():
        if cls.__name__ == short or f"{cls.__module__}.{cls.__name__}" == path:
            return cls
    known = ", ".join(sorted(cls.__name__ for cls in _REGISTRY.values()))
    raise ValueError(f"unknown strategy class {path!r}; known: {known}")


def reference(name: str) -> Reference | None:
    """The published method behind strategy ``name`` (None for a strategy that declares none, such as a custom one).

    Raises:
        ValueError: no strategy has that name.
    """
    return lookup(name).reference


__all__ = ["FUSION_BENCH", "MERGEKIT", "STRATEGIES", "Reference", "by_class_path", "lookup", "names", "reference",
           "register"]
