"""The one bounded scheduler of the merge engine and the continual fold: work items run on a few worker threads, and
the bytes the running items hold never exceed a memory budget.

Each item declares its cost in bytes (what its job allocates: its inputs, their float32 copies, a strategy's
temporaries, its output; see :meth:`Strategy.working_set`). An item is started only while the running items' costs
plus its own stay within the budget; an item that alone exceeds it runs alone. A slot is freed when its item
finishes, not when its result's turn comes, so a small item between two large ones never leaves a worker idle.
Results are yielded in the items' order.

How large items stay within a budget is the callers' part: the engine splits a tensor whose strategy is
:attr:`~lightning_merge.strategies.Strategy.row_local` into row chunks (:func:`row_chunks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: the default memory budget of a merge and of a continual add: the bytes their tensor jobs hold at once
DEFAULT_MEMORY_BUDGET = 192 << 20

#: a row chunk is never smaller than this many elements (smaller ones cost more in calls than they save in memory)
MIN_CHUNK_ELEMENTS = 1 << 16

#: a row chunk costs at most this fraction of the memory budget (1/8: 24 MiB of the default budget). The C library
#: keeps the memory of freed chunks for the next ones (faster than returning it), so what a chunked tensor holds at
#: its peak grows with the chunk's size, not with the number of chunks: measured on a merge of a 256 MiB tensor
#: (three experts and a base), TIES' peak above start-up went from 1.74× the tensor with chunks of half the budget to
#: 0.59× with chunks of an eighth, task arithmetic's from 1.19× to 0.37× (docs/performance.md#chunk-size)
CHUNK_FRACTION = 8


#: the size from which glibc serves an allocation by mmap once :func:`limit_heap_growth` has run
MMAP_THRESHOLD = 4 << 20


def limit_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more from mmap (returned to the system when freed), not from the
    heap: glibc's default raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    row chunks come from the heap, and a small allocation kept between them pins it. Measured on a continual add over
    a 256 MiB tensor (3 adds): 413 MiB above start-up with glibc's default, 210 MiB with a 4 MiB threshold, at 1.35×
    the time (and 1.4× on merges of 16 MiB tensors). Process-wide and permanent (``mallopt(M_MMAP_THRESHOLD)``), so
    nothing calls it by default: call it in your process, or start one with ``MALLOC_MMAP_THRESHOLD_=4194304``
    (``MALLOC_MMAP_THRESHOLD_=4194304 lightning-merge merge ...``) when memory matters more than time.

    Returns:
        Whether it took effect (False where the C library is not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def chunk_limit(budget: int, workers: int) -> int:
    """The bytes one row chunk may cost: a worker's share of ``budget`` (so that chunks run side by side), and at most
    :data:`CHUNK_FRACTION`'s share of it (see there).

    Args:
        budget: the memory budget in bytes.
        workers: the worker threads the budget is shared by.
    """
    return max(1, min(budget // max(1, workers), budget // CHUNK_FRACTION))


def release_freed_memory() -> bool:
    """Return the C library's free heap pages to the system (glibc's ``malloc_trim(0)``): :func:`bounded_map` calls
    it after each item that costs more than half the budget (no second item of its size fits beside it: a whole
    tensor no row chunk could split, such as an SVD's). The heap keeps such an item's freed blocks, and the next
    item's blocks, of other sizes or on another worker thread's heap, do not all fit in them. Measured on OPCM's
    continual add over 16 tensors of 2048² float32 (256 MiB): 1.55× the model above start-up without it, 1.52× with
    it (and the base freed before the fold; separate runs: 1.48× without, 1.41× with), when OPCM's items cost more
    than the budget; once the fold's temporaries were cut and each item costs 144 MiB of the 192 MiB budget, a second
    add's peak was 278 MiB above start-up with a trim only after items over the budget, 207 MiB with it after items
    over half of it. Row chunks are not followed by it: they are small (at most :func:`chunk_limit`, an eighth of the
    budget), their blocks are reused as they are, and pages given back are faulted in again (at a cost in time).

    Returns:
        Whether it ran (False where the C library is not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def row_chunks(shape: Sequence[int], bytes_per_element: float, budget: int,
               chunk: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` along the first axis of a tensor of ``shape``: one range for a tensor whose
    cost (its elements × ``bytes_per_element``) fits ``budget``, or one of fewer than two dimensions; otherwise
    chunks that each cost at most ``chunk`` (default ``budget``), equal but for the last; a row never splits.

    Args:
        shape: the tensor's shape.
        bytes_per_element: what one element of the tensor costs its job (all inputs, temporaries and output).
        budget: the bytes the whole tensor may cost before it is split.
        chunk: the bytes a chunk may cost (the budget's share of one worker, so that chunks run side by side).
    """
    rows = int(shape[0]) if len(shape) else 0
    if len(shape) < 2 or rows <= 1:
        return [(0, rows)]
    row_elements = 1
    for d in shape[1:]:
        row_elements *= int(d)
    total = rows * row_elements * bytes_per_element
    if total <= budget:
        return [(0, rows)]
    fitting = int((chunk or budget) // max(row_elements * bytes_per_element, 1))
    per = max(1, fitting, -(-MIN_CHUNK_ELEMENTS // max(row_elements, 1)))
    count = -(-rows // per)
    per = -(-rows // count)  # the same number of rows in each chunk, the last one possibly fewer
    return [(start, min(start + per, rows)) for start in range(0, rows, per)]


def bounded_map(fn: Callable[[T], R], items: Sequence[T], costs: Sequence[int], budget: int, *,
                workers: int | None = None, sizes: Sequence[int] | None = None, desc: str = "working",
                progress: bool | None = None, share_threads: bool = False) -> Iterator[R]:
    """``fn(item)`` for each item on up to ``workers`` threads within the memory ``budget``; results in item order.

    An error in any ``fn`` cancels the items not started and is raised here (after the running ones finish).

    Args:
        fn: called with each item (from a worker thread when ``workers`` > 1).
        items: the work items, in the order results are yielded.
        costs: each item's cost in bytes (see the module docstring).
        budget: the bytes the running items may hold together; an item costing more runs alone. After an item
            costing more than half of it, the memory it freed is returned to the system (:func:`release_freed_memory`).
        workers: worker threads (default: the CPU count, at most 2; never more than the items). 1 runs every item
            in this thread.
        sizes: each item's size for the progress bar (default: its cost).
        desc: the progress bar's label.
        progress: show a progress bar (default: when stderr is a terminal).
        share_threads: give each item ``torch.get_num_threads() // k`` intra-op threads, ``k`` the number of
            items of its cost the budget lets run at once (at most ``workers``; restored after): items side by side do
            not oversubscribe the cores, and an item the budget runs alone keeps every thread. Decided from the
            cost, not from what happens to be running, so a computation whose floats depend on its thread count
            (an SVD) gives the same result every run.
            torch's thread count is the process's: while items share, every item computes with the last share set,
            so only computations whose floats do not depend on it share.

    Yields:
        ``fn(item)`` for each item, in the order of ``items``.
    """
    from lightning_merge.files.progress import Progress

    sizes = list(costs) if sizes is None else list(sizes)
    count = max(1, min(workers or min(2, os.cpu_count() or 1), len(items) or 1))
    bar = Progress(desc, sum(sizes), progress)
    total_threads = torch.get_num_threads()
    try:
        if count == 1:
            for item, cost, size in zip(items, costs, sizes):
                yield fn(item)
                if 2 * cost > budget:  # a large item (see release_freed_memory)
                    release_freed_memory()
                bar.update(size)
            return
        def call(item: T, share: int | None) -> R:
            if share is not None:  # each item sets its own share (torch's count is the process's)
                torch.set_num_threads(share)
            return fn(item)

        pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="lightning-merge")
        running: dict[Future, tuple[int, int, int]] = {}
        results: dict[int, Any] = {}
        held = 0
        turn = 0

        def collect(block: bool) -> None:
            nonlocal held
            done, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                index, cost, size = running.pop(future)
                held -= cost
                results[index] = future.result()
                if 2 * cost > budget:  # a large item (see release_freed_memory)
                    release_freed_memory()
                bar.update(size)

        def ready() -> Iterator[Any]:
            nonlocal turn
            while turn in results:
                yield results.pop(turn)
                turn += 1

        try:
            for index, (item, cost, size) in enumerate(zip(items, costs, sizes)):
                while running and (len(running) >= count or held + cost > budget):
                    collect(block=True)
                # the items that can run beside this one within the budget share the threads; one that must run
                # alone computes with all of them (from its cost and the budget only: the same threads, so the same
                # floats, every run)
                beside = max(1, min(count, budget // max(cost, 1)))
                share = max(1, total_threads // beside) if share_threads else None
                running[pool.submit(call, item, share)] = (index, cost, size)
                held += cost
                collect(block=False)
                yield from ready()
            while running:
                collect(block=True)
                yield from ready()
        finally:
            for future in running:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if share_threads:
            torch.set_num_threads(total_threads)
        bar.close()


__all__ = ["CHUNK_FRACTION", "DEFAULT_MEMORY_BUDGET", "MIN_CHUNK_ELEMENTS", "MMAP_THRESHOLD", "bounded_map",
           "chunk_limit", "limit_heap_growth", "release_freed_memory", "row_chunks"]
