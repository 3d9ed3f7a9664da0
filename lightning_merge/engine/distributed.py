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

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lightning_merge.errors import PeerFailed


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


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT = 120.0
_REMEDIES = ("run every rank under the launcher (`torchrun --nproc-per-node N -m lightning_merge merge ...`), or "
             "merge in one process: unset WORLD_SIZE and RANK, or pass --nproc 1")


def _found(environ: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={environ[k]}" for k in LAUNCHER_VARIABLES if k in environ) or "none"


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes a launcher (``torchrun``) described in the environment: ``WORLD_SIZE``, else 1.

    Raises:
        ValueError: ``WORLD_SIZE`` is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"the environment variable WORLD_SIZE={text!r} is not a positive integer (variables of a "
                         f"launcher found: {_found(environ)}); {_REMEDIES}")
    return size


def join_launcher_group(timeout: float = RENDEZVOUS_TIMEOUT, environ: Mapping[str, str] | None = None) -> bool:
    """Join the gloo process group a launcher such as ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), waiting at most ``timeout`` seconds for every rank to arrive.

    Every variable is checked before anything waits, and a rank that is missing after ``timeout`` seconds is an
    error naming the variables found, instead of gloo's 30-minute wait. Once every rank has arrived, the group's
    collectives keep torch's default timeout (a rank may be busy with a large tensor for minutes).

    Args:
        timeout: seconds to wait for the other ranks (and, on ranks other than 0, for rank 0's rendezvous server).
        environ: the environment to read (default ``os.environ``).

    Returns:
        ``True`` when a group was joined; ``False`` when the environment describes a single process (``WORLD_SIZE``
        unset or 1), in which case nothing is done.

    Raises:
        ValueError: a variable is missing or invalid (``RANK`` outside ``[0, WORLD_SIZE)``, ``MASTER_PORT`` not a
            port) or ``timeout`` is not positive.
        TimeoutError: not every rank arrived within ``timeout`` seconds.
        ConnectionError: the rendezvous server could not be reached or started.
    """
    import time
    from datetime import timedelta

    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    if not 0 < timeout < float("inf"):
        raise ValueError(f"the rendezvous timeout must be a positive number of seconds, got {timeout}")
    world_size = launcher_world_size(environ)
    if world_size == 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k, "").strip()]
    if missing:
        raise ValueError(f"this process looks like one rank of a {world_size}-process job (variables found: "
                         f"{_found(environ)}) but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         f"set, so it cannot join the others; {_REMEDIES}")
    try:
        rank = int(environ["RANK"])
        if not 0 <= rank < world_size:
            raise ValueError
    except ValueError:
        raise ValueError(f"RANK={environ['RANK']!r} is not a rank of a {world_size}-process job (an integer from 0 "
                         f"to {world_size - 1}; variables found: {_found(environ)}); {_REMEDIES}") from None
    host = environ["MASTER_ADDR"].strip()
    try:
        port = int(environ["MASTER_PORT"])
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"MASTER_PORT={environ['MASTER_PORT']!r} is not a TCP port (variables found: "
                         f"{_found(environ)}); {_REMEDIES}") from None

    where = f"MASTER_ADDR:MASTER_PORT = {host}:{port}"
    deadline = time.monotonic() + timeout

    def late(what: str) -> TimeoutError:
        return TimeoutError(f"rank {rank} of {world_size}: {what} within {timeout:g} s (variables found: "
                            f"{_found(environ)}); {_REMEDIES}; or give the ranks longer with --rendezvous-timeout")

    # torchrun's agent hosts the store itself (every worker is a client); otherwise rank 0 hosts it, as env:// does.
    hosts = rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        if hosts:
            with _native_log_held():
                store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timedelta(seconds=timeout),
                                      wait_for_workers=False, multi_tenant=True)
        else:
            _wait_for_server(host, port, deadline, late, where)
            left = max(deadline - time.monotonic(), 1.0)
            with _native_log_held():  # a listener that never answers blocks torch's client past its timeout
                store = _within(left + 5.0, lambda: dist.TCPStore(host, port, world_size, is_master=False,
                                                                  timeout=timedelta(seconds=left)),
                                lambda: late(f"the program listening at {where} never answered as a rendezvous "
                                             "store (another program holds MASTER_PORT?)"))
        key = "lightning_merge/joined/{}/{}".format(environ.get("TORCHELASTIC_RUN_ID", ""),
                                                    environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        arrived = store.add(key, 1)
        while arrived < world_size:
            if time.monotonic() > deadline:
                raise late(f"only {arrived} of the {world_size} ranks joined the rendezvous at {where}")
            time.sleep(0.05)
            arrived = store.add(key, 0)
    except dist.DistError as err:
        first = " ".join(str(err).split("Exception raised from")[0].split())
        raise ConnectionError(f"rank {rank} of {world_size}: the rendezvous at {where} failed ({first}; variables "
                              f"found: {_found(environ)}); {_REMEDIES}") from None
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return True


def _within(seconds: float, fn: Callable[[], Any], late: Callable[[], BaseException]) -> Any:
    """``fn()`` on a helper thread, or ``late()`` raised when it has not returned within ``seconds`` (the thread is
    left blocked; it is a daemon, so the process still exits)."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, name="lightning-merge-rendezvous", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise late()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def _native_log_held() -> Iterator[None]:
    """Hold what C++ code writes to stderr (file descriptor 2) meanwhile: torch's TCPStore logs a stack trace at every
    failed connection attempt. It is written out when the block succeeds and dropped when it raises (the error,
    made into one line, says what happened)."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def _wait_for_server(host: str, port: int, deadline: float, late: Callable[[str], TimeoutError], where: str) -> None:
    """Wait for a TCP server at ``host:port`` in Python (torch's client logs a C++ stack trace at every retry)."""
    import socket
    import time

    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except socket.gaierror as err:
            raise ConnectionError(f"MASTER_ADDR={host!r} does not resolve ({err.strerror}); {_REMEDIES}") from None
        except OSError:
            if time.monotonic() > deadline:
                raise late(f"no rendezvous server answered at {where} (rank 0 hosts it)") from None
            time.sleep(0.2)


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


__all__ = [
    "Distribution",
    "PeerFailed",
    "die_with",
    "init_process_group",
    "join_launcher_group",
    "launcher_world_size",
    "spawn",
]
