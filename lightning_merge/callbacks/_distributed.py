"""Rank-0 work that every rank waits for, without ever leaving a rank waiting forever.

:func:`on_rank_zero` runs a function on global rank 0, then broadcasts whether it failed: every rank returns the
result (rank 0) or None, or every rank raises (rank 0 its own exception, the others a :class:`RankZeroError` that
quotes it). The broadcast is the barrier, so a failure on rank 0 can never strand the others at a later barrier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lightning_merge.errors import RankZeroError

T = TypeVar("T")



def on_rank_zero(trainer: Any, fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on global rank 0 and make every rank share its outcome.

    Args:
        trainer: the Trainer (its strategy broadcasts).
        fn: the work; called on rank 0 only.
        what: a short description for the error the other ranks raise ("MergeOnFitEnd: the merge").

    Returns:
        ``fn()``'s result on rank 0, None on the other ranks.

    Raises:
        The exception ``fn`` raised (rank 0), or :class:`RankZeroError` naming it (the other ranks).
    """
    result: T | None = None
    error: BaseException | None = None
    if trainer.is_global_zero:
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if trainer.world_size > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        message = trainer.strategy.broadcast(message, src=0)
        if message is not None and error is None:
            raise RankZeroError(f"{what} failed on rank 0: {message}")
    if error is not None:
        raise error
    return result


__all__ = ["RankZeroError", "on_rank_zero"]
