"""The merge engine: a plan of tensor jobs (:mod:`.run`), the writers of every output (:mod:`.writers`) and the
split of a merge over ranks (:mod:`.distributed`).

``lightning_merge.engine`` was one module before 0.3; its names (``merge``, ``prepare``, ...) are still reachable
here, with a :class:`DeprecationWarning`: import them from :mod:`lightning_merge` instead.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.engine.run", name)
