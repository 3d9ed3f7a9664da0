"""The merge engine: the options of a merge, checked once (:mod:`.options`), the plan of tensor jobs (:mod:`.plan`),
the choice and checks of the output (:mod:`.outputs`), the driver that runs the jobs (:mod:`.run`), the writers of
every output (:mod:`.writers`, with the low-rank factoring of adapters in :mod:`.lowrank`) and the split of a merge
over ranks (:mod:`.distributed`).

``lightning_merge.engine`` was one module before 0.3; its names (``merge``, ``prepare``, ...) are still reachable
here, with a :class:`DeprecationWarning`: import them from :mod:`lightning_merge` instead.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.engine.run", name)
