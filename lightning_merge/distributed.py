"""A merge split over the ranks of a ``torch.distributed`` process group.

Every rank opens the inputs' headers and builds the same plan; the tensors are assigned to ranks balanced by bytes
(largest first, to the least loaded rank), and each rank reads, merges and writes only its own. The model-wide first
passes (top-k thresholds, Fisher norms, LiNeS' α, OPCM's factor) compute per-tensor partial results on the owning
rank, exchange them, and reduce them in the plan's tensor order on every rank, so every float is the one a single
process computes: the output is bit-identical whatever the number of ranks, given the same torch thread count per
process (LAPACK and BLAS results, as in OPCM's and TSV-M's SVDs, change in the last bits with it; the workers of
:func:`spawn` take the launching process's count, while ``torchrun`` sets ``OMP_NUM_THREADS=1`` unless told
otherwise).

All communication is one primitive, :meth:`Distribution.exchange` (an ``all_gather_object`` of ``(tag, ok,
payload)``), so a rank that fails anywhere announces its error in the next exchange, whatever exchange the others
are in: every rank raises :class:`PeerFailed` with the failing rank's message and none waits forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any


class PeerFailed(RuntimeError):
    """Another rank of a distributed merge failed; the message is its error."""


class Distribution:
    """The process group a merge is split over.

    Args:
        group: a ``torch.distributed`` process group, or ``"world"`` for the default group (initialised by the
            caller: ``torchrun``, Lightning, or :func:`init_process_group`).
    """

    def __init__(self, group: Any = "world"):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "group=: torch.distributed is not initialised; launch with torchrun (or `lightning-merge merge "
                "--nproc N`), or call torch.distributed.init_process_group first"
            )
        self.group = None if group in ("world", None) else group
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.owned: set[str] = set()
        self.announced = False  # this rank told the others it failed (no further exchange may follow)

    # -- the one collective ----------------------------------------------------------------------------------------
    def exchange(self, tag: str, payload: Any = None, error: BaseException | None = None) -> list[Any]:
        """Every rank's payload for step ``tag`` (in rank order). A rank passing ``error`` announces its failure:
        every rank then raises :class:`PeerFailed` naming it (the announcing rank re-raises its own error)."""
        import torch.distributed as dist

        if error is not None:
            self.announced = True
        mine = (tag, error is None, payload if error is None else f"{type(error).__name__}: {error}")
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, mine, group=self.group)
        failed = [(r, g) for r, g in enumerate(gathered) if not g[1]]
        if error is not None:
            raise error
        if failed:
            rank, (_, _, message) = failed[0]
            raise PeerFailed(f"rank {rank} of the distributed merge failed: {message}")
        tags = {g[0] for g in gathered}
        if len(tags) != 1:
            raise PeerFailed(f"the ranks of the distributed merge are out of step ({sorted(tags)}); they must run "
                             "the same merge with the same arguments")
        return [g[2] for g in gathered]

    def attempt(self, tag: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` on this rank; if it raises, the error is announced at exchange ``tag`` (every other rank raises
        :class:`PeerFailed` there) and re-raised here."""
        try:
            return fn()
        except PeerFailed:
            raise
        except BaseException as err:
            self.exchange(tag, error=err)
            raise

    # -- work split ------------------------------------------------------------------------------------------------
    def assign(self, sizes: Sequence[tuple[str, int]]) -> set[str]:
        """This rank's names: largest first to the least loaded rank (ties to the lower rank), deterministic."""
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], i))
        load = [0] * self.size
        owner: dict[str, int] = {}
        for i in order:
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[sizes[i][0]] = rank
            load[rank] += sizes[i][1]
        self.owned = {name for name, rank in owner.items() if rank == self.rank}
        return self.owned

    def gather_map(self, names: Sequence[str], fn: Callable[[str], Any], tag: str) -> dict[str, Any]:
        """``{name: fn(name)}`` for every name, in ``names`` order, each computed by the rank that owns it."""
        local = self.attempt(tag, lambda: {n: fn(n) for n in names if n in self.owned})
        merged: dict[str, Any] = {}
        for part in self.exchange(tag, local):
            merged.update(part)
        return {n: merged[n] for n in names}


def init_process_group(rank: int, world_size: int, init_file: str) -> None:
    """Join a gloo process group through a file rendezvous (the workers of ``lightning-merge merge --nproc``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def spawn(nproc: int, fn: Callable[..., Any], args: tuple) -> None:
    """Run ``fn(rank, world_size, init_file, *args)`` in ``nproc`` fresh processes (spawned), on this machine.

    Raises:
        RuntimeError: a worker failed (its error is in its own output; every worker raises when one fails).
    """
    import tempfile

    import torch
    import torch.multiprocessing as mp

    # Each worker computes with this process's torch thread count: LAPACK and BLAS results (OPCM's and TSV-M's
    # SVDs, matmuls) depend on it in the last bits, so only the same count gives one process's bytes.
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="lightning-merge-rendezvous-") as folder:
        init_file = os.path.join(folder, "init")
        context = mp.start_processes(_worker, args=(nproc, init_file, threads, fn, args, os.getpid()), nprocs=nproc,
                                     join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as err:
            raise RuntimeError(str(err).strip().splitlines()[-1]) from None
        except mp.ProcessExitedException as err:
            raise RuntimeError(f"a merge worker exited: {err}") from None


def _worker(rank: int, world_size: int, init_file: str, threads: int, fn: Callable[..., Any], args: tuple,
            launcher: int | None = None) -> None:
    import torch
    import torch.distributed as dist

    if launcher is not None:
        die_with(launcher)
    torch.set_num_threads(threads)
    init_process_group(rank, world_size, init_file)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def die_with(parent: int, interval: float = 0.2) -> None:
    """End this process when ``parent`` (the launcher) ends, so a merge whose launcher was killed never commits its
    output later: the kernel kills it (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and a watchdog thread exits it
    where the kernel cannot (and covers a launcher that died before the ``prctl``)."""
    import ctypes
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="lightning-merge-launcher-watch", daemon=True).start()


__all__ = ["Distribution", "PeerFailed", "die_with", "init_process_group", "spawn"]
