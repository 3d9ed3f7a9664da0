"""Folding one expert into a continual state: the strategy's continual form applied tensor by tensor on a bounded
pool of worker threads, streamed from the current generation's running quantities into a new generation's, then the
merged model and the metadata of that generation. The commit is the store's
(:meth:`~lightning_merge.continual.store.StateStore._commit`)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_merge._version import __version__
from lightning_merge.continual.checks import check_distance
from lightning_merge.continual.layout import FORMAT
from lightning_merge.continual.store import StateStore
from lightning_merge.engine.schedule import (
    DEFAULT_MEMORY_BUDGET,
    bounded_map,
    chunk_limit,
    release_freed_memory,
    row_chunks,
)
from lightning_merge.engine.writers import copy_support_files, write_json
from lightning_merge.errors import ContinualError
from lightning_merge.files.atomic import fsync_dir
from lightning_merge.files.finite import cast_checked, largest_magnitude
from lightning_merge.files.safetensors import SafetensorsError, SafetensorsFile, ShardWriter, TensorSpec
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies.base import ContinualForm, ContinualSummary

#: how the dtype of a continual state's model is chosen (it is the base's), for messages
CONTINUAL_DTYPE_HINT = ("a continual model is written in its base's dtype: create the state over a copy of the base in "
                        "that dtype")


def build_generation(state: StateStore, tmp: Path, expert: Expert, current: Path | None, meta: dict[str, Any],
                     entry: dict[str, Any], force: bool, progress: bool | None = None,
                     threads: int | None = None, memory_budget: int | None = None) -> None:
    """Write the generation that folds ``expert`` into ``current`` into the new folder ``tmp``: its running
    quantities, merged model and ``meta.json``, all durable when this returns. On any error ``tmp`` is removed.

    Args:
        state: the state.
        tmp: the folder to create (under ``generations/``, named as the store names partial generations).
        expert: the expert, checked against the state (:func:`~lightning_merge.continual.checks.check_expert`).
        current: the last committed generation, or None before the first expert.
        meta: its ``meta.json``.
        entry: the expert's journal entry.
        force: fold in an expert that looks unrelated to the base (see
            :func:`~lightning_merge.continual.checks.check_distance`).
        progress: show progress bars (default: when stderr is a terminal).
        threads: tensors folded at once (see :func:`parallel_map`).
        memory_budget: the bytes the tensors folded at once may hold (default 192 MiB): each costs its continual
            form's :meth:`~lightning_merge.strategies.ContinualForm.working_set` float32 copies of its elements.

    Raises:
        ContinualError: a damaged generation, a changed base, non-finite results, an unrelated expert.
    """
    from lightning_merge.files.progress import track

    base = as_expert(state.config["base"], "base")
    names = list(state.config["tensors"])
    form = state.form
    count = meta["count"]
    ctx = form.begin(count, expert, names)
    previous = previous_model = None
    if current is not None:
        counters = any(n.endswith("num_batches_tracked") for n in base.names() if n not in names)
        for what, file in (("running quantities", "running.safetensors"), ("model", "model/model.safetensors")):
            if what == "model" and not counters:
                continue  # the previous model is read only for the counters it carries forward
            try:
                handle = SafetensorsFile(current / file)
            except (SafetensorsError, OSError) as err:
                if previous is not None:
                    previous.close()
                raise ContinualError(
                    f"continual state '{state.path}': the {what} of generation '{current.name}' cannot be read "
                    f"({err}); the state is damaged (restore it from a backup, or start a new state)"
                ) from None
            if what == "model":
                previous_model = handle
            else:
                previous = handle
    writers: list[ShardWriter] = []
    try:
        (tmp / "model").mkdir(parents=True)
        running_entries = [(f"{q}/{n}", TensorSpec(tuple(state.config["tensors"][n]), dtype))
                           for n in names for q, dtype in form.quantities]
        running = ShardWriter(tmp / "running.safetensors", running_entries, {"format": FORMAT})
        writers.append(running)
        model_entries = [(n, TensorSpec(tuple(base.spec(n).shape), base.spec(n).dtype)) for n in base.names()]
        model = ShardWriter(tmp / "model" / "model.safetensors", model_entries, {"format": "pt"})
        writers.append(model)
        fingerprints = state.config["base_fingerprint"]
        totals: dict[str, float] = {}
        squares: list[float] = []  # Σ τ² of each row, summed exactly at the end: the same norm whatever the chunks
        kinds = len(state.strategy.requires)
        # a form that does not subclass ContinualForm (duck-typed) gets the defaults
        sized = getattr(form, "working_set", None)
        per_element = 4 * (sized(kinds) if sized is not None else ContinualForm.working_set(form, kinds))
        budget = memory_budget or DEFAULT_MEMORY_BUDGET
        chunked = getattr(form, "row_local", False)

        def ranges(shape: tuple[int, ...], limit: int) -> list[tuple[int, int] | None]:
            """A tensor's row chunks (each within :func:`~lightning_merge.engine.schedule.chunk_limit`) when it costs
            more than ``limit`` bytes, or ``[None]`` (whole): only a row-local form's split."""
            found = row_chunks(shape, per_element, limit, chunk) if chunked else []
            return found if len(found) > 1 else [None]

        workers = fold_workers(threads, len(names))
        per_worker, chunk = max(1, budget // workers), chunk_limit(budget, workers)
        items = [(n, rows) for n in names for rows in ranges(tuple(state.config["tensors"][n]), per_worker)]

        def fold(item: tuple[str, tuple[int, int] | None]) -> tuple[list[float], dict[str, float]]:
            """Fold tensor ``n`` (or its ``rows``, for a row-local form) in and write its new running quantities
            (tensors and row chunks are independent: threads)."""
            n, rows = item
            if rows is None or rows[0] == 0:
                if base.fingerprint(n) != fingerprints[n]:
                    raise ContinualError(
                        f"the base '{state.config['base']}' changed since the state was created (tensor '{n}' differs "
                        "from its fingerprint in state.json); restore the original base file"
                    )
            b = base.float32(n, rows)
            # a tensor the expert lacks (on_missing="base") is unchanged, as the batch merge reads the base's
            tau = expert.float32(n, rows) - b if n in expert else torch.zeros_like(b)
            del b  # not held through the fold (an SVD's working set is large enough)
            prev = None
            if previous is not None:
                try:
                    prev = {q: previous.get(f"{q}/{n}", rows).to(dtype) for q, dtype in form.quantities}
                except (KeyError, SafetensorsError) as err:
                    raise ContinualError(
                        f"continual state '{state.path}': generation '{current.name}' has no running quantities "
                        f"for '{n}' ({err}); the state is damaged"
                    ) from None
            stats = {kind: expert.statistic(n, kind, rows=rows) for kind in state.strategy.requires}
            new = form.fold(n, prev, tau, stats, ctx)
            del prev, stats  # the previous quantities are not held through the squares below
            for q, dtype in form.quantities:
                if rows is None:
                    running.write(f"{q}/{n}", new[q].to(dtype).contiguous())
                else:
                    running.write_rows(f"{q}/{n}", rows[0], new[q].to(dtype).contiguous())
            # τ as the fold left it (a form may mask it in place); τ is float32, so .double() copies: squared in place
            per_row = tau.double().square_().reshape(tau.shape[0] if tau.dim() else 1, -1).sum(1)
            del tau
            return per_row.tolist(), form.reduce(n, new)

        def row_size(item: tuple[str, tuple[int, int] | None]) -> int:
            n, rows = item
            whole = base.spec(n).nbytes
            return whole if rows is None else whole // base.spec(n).shape[0] * (rows[1] - rows[0])

        sizes = [row_size(item) for item in items]
        costs = [int(size // base.spec(n).dtype.itemsize * per_element) for (n, _), size in zip(items, sizes)]
        for square, reduced in parallel_map(fold, items, sizes, "folding in", progress, threads, costs, budget):
            squares.extend(square)
            for key, value in reduced.items():
                totals[key] = totals.get(key, 0.0) + value
        running.close(sync=True)
        norm = math.sqrt(math.fsum(squares))
        check_distance(expert, norm, meta["norms"], force)
        summary = ContinualSummary(
            count=count + 1,
            norms=(*meta["norms"], norm),
            weights=(*meta["weights"], ctx.weight),
            totals=totals,
            names=tuple(names),
        )
        with SafetensorsFile(tmp / "running.safetensors") as fresh:
            every = base.names()
            for n in track(every, [base.spec(n).nbytes for n in every], "writing the model", progress):
                if n not in state.config["tensors"]:  # non-floating tensors: the base's (checked equal) ...
                    value = base.tensor(n)
                    if n.endswith("num_batches_tracked") and n in expert:  # ... or the largest seen, as merge()
                        seen = previous_model.get(n) if previous_model is not None else value
                        value = torch.maximum(seen, expert.tensor(n).to(seen.dtype))
                    model.write(n, value.to(base.spec(n).dtype).contiguous())
                    continue
                for rows in ranges(tuple(base.spec(n).shape), budget):
                    quantities = {q: fresh.get(f"{q}/{n}", rows) for q, _ in form.quantities}
                    merged = form.finish(n, base.float32(n, rows), quantities, summary)
                    magnitude = largest_magnitude(merged)  # one reduction: finiteness, then the base dtype's range
                    if not math.isfinite(magnitude):
                        raise ContinualError(f"continual {state.strategy.name} produced non-finite values at '{n}'")
                    value = cast_checked(merged, base.spec(n).dtype, n, CONTINUAL_DTYPE_HINT,
                                         magnitude=magnitude).contiguous()
                    if rows is None:
                        model.write(n, value)
                    else:
                        model.write_rows(n, rows[0], value)
        model.close(sync=True)
        release_freed_memory()  # the model's blocks (this thread's heap) are not held into the next add
        base_path = Path(state.config["base"])
        if base_path.is_dir():
            copy_support_files(base_path, tmp / "model")
        new_meta = {
            "count": count + 1,
            "norms": list(summary.norms),
            "weights": list(summary.weights),
            "totals": totals,
            "journal": [*meta["journal"], entry],
            "strategy": state.strategy.to_dict(),
            "library_version": __version__,
        }
        write_json(tmp / "meta.json", new_meta)
        fsync_dir(tmp / "model")
        fsync_dir(tmp)
    except BaseException:
        for writer in writers:
            writer.close(sync=False)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for handle in (previous, previous_model):
            if handle is not None:
                handle.close()


def fold_workers(threads: int | None, count: int) -> int:
    """The worker threads of a fold over ``count`` tensors: ``threads``, or the CPU count up to 4; never more than the
    tensors."""
    return max(1, min(threads or min(4, os.cpu_count() or 1), count or 1))


def parallel_map(fn: Any, names: list[str], sizes: list[int], desc: str, progress: bool | None,
                 threads: int | None, costs: list[int] | None = None, budget: int | None = None) -> Iterator[Any]:
    """``fn(name)`` for each name on ``threads`` worker threads (each with its share of torch's threads), results
    yielded in the order of ``names``: the engine's bounded scheduler
    (:func:`~lightning_merge.engine.schedule.bounded_map`).

    Memory: the running tensors' ``costs`` stay within ``budget`` (a tensor costing more runs alone); a slot is freed
    when its tensor finishes, not when its result's turn comes, so a small tensor (a bias) between two large ones
    (weights) never leaves a worker idle. An error in any ``fn`` cancels the queued ones and is raised here.

    Args:
        fn: called with each name.
        names: the names, in the order results are yielded.
        sizes: each name's tensor size in bytes (the progress bar).
        desc: the progress bar's label.
        progress: show a progress bar (default: when stderr is a terminal).
        threads: worker threads (default: the CPU count, at most 4; never more than the names).
        costs: what folding each tensor holds, in bytes (default: ``sizes``).
        budget: the bytes the running tensors may hold together (default: ``threads`` × the largest cost).

    Yields:
        ``fn(name)`` for each name, in the order of ``names``.
    """
    workers = fold_workers(threads, len(names))
    costs = list(sizes) if costs is None else costs
    if budget is None:
        budget = workers * max(costs, default=0)
    yield from bounded_map(fn, names, costs, budget, workers=workers, sizes=sizes, desc=desc, progress=progress,
                           share_threads=True)
