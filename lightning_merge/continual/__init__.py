"""Continual merging: a state folder (or bucket prefix) that folds in one expert at a time in constant memory.

``lightning_merge.continual`` was one module before 0.3; its names (``ContinualState``, ``ContinualError``, ...) are
still reachable here, with a :class:`DeprecationWarning`: import them from :mod:`lightning_merge` instead.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.continual.state", name)
