"""The child side of tests/properties/test_crash_safety.py.

Children are forked from a multiprocessing *forkserver* (a fresh interpreter that imported torch and lightning_merge
and never ran a parallel region or a thread), not from the pytest process: a child forked from a process with live
threads (the suite's S3 server, torch's OpenMP pool, earlier process groups) can inherit a lock held at the fork and
wait on it forever. Everything a child runs is named here at module level so that it pickles by reference.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import torch

import lightning_merge.files.atomic as lio
from lightning_merge import ContinualState

HOOKED = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "fsync"), (os, "mkdir"),
          (os, "symlink"), (lio, "_exchange"), (lio, "_rename_noreplace")]


def continual_add(folder: str, path: str) -> None:
    """``ContinualState(folder).add(path)``."""
    ContinualState(folder).add(path)


def _no_exchange(a: Any, b: Any) -> bool:
    return False  # a filesystem without renameat2(RENAME_EXCHANGE)


def run(action: Callable[[], None], kill_at: int | None, no_exchange: bool, conn: Any) -> None:
    """Run ``action`` with every call in :data:`HOOKED` counted, SIGKILLing this process just before the
    ``kill_at``-th; send the number of calls made through ``conn`` when it finishes. Exit status 3 if it raised."""
    torch.set_num_threads(1)
    if no_exchange:
        lio._exchange = _no_exchange
    calls = [0]

    def hook(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if kill_at is not None and calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped

    for module, name in HOOKED:
        setattr(module, name, hook(getattr(module, name)))
    try:
        action()
    except BaseException:  # noqa: BLE001 - reported as the exit status
        os._exit(3)
    conn.send(calls[0])
    conn.close()
    os._exit(0)
