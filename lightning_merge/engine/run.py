"""The streaming merge driver: for each tensor name, read base + experts, call the prepared strategy, write, free.

Peak memory stays near one tensor × (N + 2) per worker thread, not N models. Everything that can be checked is
checked before the first tensor is merged: the options (once, in :class:`~lightning_merge.engine.options.MergeOptions`),
names, shapes and dtypes (headers only, :mod:`.plan`), the statistics the strategy needs, the output path and the
strategy's algebra for the chosen output (:mod:`.outputs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge._version import __version__
from lightning_merge.engine.options import MergeOptions, parse_dtype
from lightning_merge.engine.outputs import (
    DryRun,
    check_out_suffix,
    check_peft_request,
    describe_plan,
    input_paths,
    make_writer,
    peft_writer,
    unique_names,
)
from lightning_merge.engine.plan import Plan, TensorJob, build_jobs, plan_merge
from lightning_merge.engine.schedule import DEFAULT_MEMORY_BUDGET, bounded_map, chunk_limit, row_chunks
from lightning_merge.engine.writers import SharedOutput, Writer
from lightning_merge.files.atomic import output_error, writing
from lightning_merge.files.finite import cast_checked, largest_magnitude
from lightning_merge.files.outputs import check_not_an_input
from lightning_merge.files.remote import is_url, staged
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies.base import Prepared, Strategy
from lightning_merge.strategies.linear import Linear

log = logging.getLogger("lightning_merge")

DTYPE_HINT = "dtype= / --dtype"  # how a merge's output dtype is chosen, for messages


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def open_inputs(experts: Any, base: Any) -> tuple[list[Expert], Expert | None]:
    """Open the experts and the base: paths, state dicts, modules or :class:`Expert` objects. A LoRA adapter folder
    opens over ``base``, or over the local base its ``adapter_config.json`` names; without ``base``, adapters that
    all name one local base give the merge its base."""
    if isinstance(experts, (str, os.PathLike, Expert, dict, nn.Module)):
        raise TypeError("experts must be a list (of paths, Expert objects, state dicts or modules)")
    base_expert = as_expert(base, "base") if base is not None else None
    opened = [as_expert(e, f"expert {i}", base=base_expert) for i, e in enumerate(experts)]
    if not opened:
        raise ValueError("merge() needs at least one expert")
    if base_expert is None and opened and all(e.lora is not None for e in opened):
        bases = {str(e.lora_base.path.resolve()) if e.lora_base.path else id(e.lora_base) for e in opened}
        if len(bases) == 1:
            base_expert = opened[0].lora_base
    return opened, base_expert


def merge(
    experts: Sequence[Expert | str | os.PathLike | dict | nn.Module],
    base: Expert | str | os.PathLike | dict | nn.Module | None = None,
    strategy: Strategy | None = None,
    out: str | os.PathLike | nn.Module | None = None,
    *,
    output: str | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    on_missing: str = "error",
    on_missing_statistic: str = "error",
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    threads: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
    rank: int | None = None,
    dry_run: bool = False,
    group: Any = None,
    unmerged_from: str = "base",
    files: dict[str, Any] | None = None,
) -> dict[str, Tensor] | Path | nn.Module | DryRun:
    """Merge experts tensor by tensor with a strategy.

    Args:
        experts: the models to merge: :class:`Expert` objects, paths (``.ckpt``, ``.safetensors``, folders, PEFT
            adapter folders), state dicts or modules.
        base: the model the experts were fine-tuned from (task vectors are ``expert − base``); required by
            strategies with ``needs_base``. LoRA adapters that all name one local base in their
            ``adapter_config.json`` supply it themselves.
        strategy: a :class:`~lightning_merge.strategies.Strategy`; default :class:`Linear` (uniform average).
        out: None returns a state dict; a folder path writes sharded safetensors (Hugging Face style, with the
            base folder's config and tokenizer files); a ``.safetensors`` path writes one file; a ``.ckpt`` path
            writes a Lightning checkpoint; an ``nn.Module`` is loaded in place. Other file suffixes (``.pt``,
            ``.bin``) are refused rather than silently written as a folder. Any of these paths may be an
            object-storage URL (``s3://bucket/merged``): the output is written locally, then uploaded with its entry
            point last (see :mod:`lightning_merge.files.remote`), and the URL is returned.
        output: ``"peft"`` to write a PEFT LoRA adapter folder at ``out`` from LoRA experts (see ``rank``); None
            writes full weights as ``out`` says.
        include: glob patterns of tensor names to merge; others are copied from the base (or the first expert).
        exclude: glob patterns of tensor names copied from the base instead of merged.
        unmerged_from: where the tensors ``include``/``exclude`` leave out come from: ``"base"`` (the default; the
            first expert holding one the base lacks) or ``"first"`` (the first expert holding it: the model a
            fit-end callback trained keeps its own head).
        files: a folder output's other files, written after the base's support files: name → text or bytes, for a
            ``.json`` file a mapping of keys to set in the base's copy (``{"config.json": {"num_hidden_layers": 6}}``;
            a mapping under a key the copy holds as an object sets that object's keys), or None to leave the base's
            copy of that file out.
            Every folder output also gets a ``README.md`` model card from the provenance unless ``files`` gives one.
        dtype: output dtype of floating tensors (default: each tensor's storage dtype in the base, or the first
            expert). Computation is always float32; rounding to the output dtype happens once, when writing.
        on_missing: tensors some experts lack: ``"error"``; ``"union"`` (keep all; a missing expert tensor counts
            as the base's, or the first holder's value is copied when the base lacks it too);
            ``"intersection"`` (drop such tensors); ``"base"`` (the base's names; a missing expert tensor counts
            as the base's).
        on_missing_statistic: an expert without a statistic the strategy requires: ``"error"``, or ``"uniform"``
            (warn and use weight 1 for that expert).
        shard_size: largest safetensors shard (``"5GB"``, ``"500MB"`` or bytes).
        overwrite: replace an earlier output of lightning-merge at ``out`` once the new one is complete (never one
            of the inputs, and never anything the tool did not write, whatever this says: see
            :mod:`lightning_merge.files.ownership`). Without it, ``out`` must not exist, up to the commit: a merge that
            finds ``out`` created by another process meanwhile raises :class:`FileExistsError`.
        threads: worker threads over tensors (default: up to 2). Whatever the count, the jobs running at once stay
            within ``memory_budget``, so threads do not raise peak memory.
        memory_budget: the bytes the tensor jobs running at once may hold: their inputs, float32 copies, the
            strategy's temporaries and the output (``"1GB"``, or bytes; default 192 MiB). A tensor whose strategy
            is :attr:`~lightning_merge.strategies.Strategy.row_local` (linear, task arithmetic, Fisher, OTA without
            FFG's top-k, the weighted median...), and a tensor copied unmerged, is merged in row chunks within it,
            with the same output bit for bit; a tensor another strategy must see whole (a top-k or norm per tensor,
            an SVD) runs alone when it exceeds the budget. See docs/performance.md.
        progress: show a progress bar (default: when stderr is a terminal).
        rank: with ``output="peft"``: None writes the exact concatenation of the adapters' factors (rank Σrᵢ; for
            strategies linear in the experts, ``strategy.linear``); an integer writes a truncated SVD of each
            merged ΔW at that rank and records the relative reconstruction error per module.
        dry_run: check everything that needs no tensor data (names, shapes, dtypes, statistics present, the output
            path) and return the plan instead of merging, a :class:`~lightning_merge.engine.outputs.DryRun`: the
            tensors to merge and copy, the experts, the strategy, the statistics found, the output's size.
        group: split the merge over the ranks of a ``torch.distributed`` process group (``"world"`` for the default
            group, as ``torchrun`` sets up; see :mod:`lightning_merge.engine.distributed`). Every rank calls ``merge``
            with the same arguments; each reads and writes only its tensors (balanced by bytes) into the shared
            output, which must be a safetensors folder or file, or a PEFT adapter folder (``output="peft"``), at a
            path every rank sees. The output is bit-identical to one process's (given the same torch thread count);
            a rank that fails makes every rank raise, and nothing is written.

    Returns:
        The merged state dict (``out=None``), the written path, or the module; with ``dry_run``, the plan (a
        :class:`~lightning_merge.engine.outputs.DryRun`).

    Raises:
        ValueError: anything that makes the merge impossible, before any tensor is merged: the message names the
            expert, tensor, statistic or argument and says what to do.
        ForeignOutput: something lightning-merge did not write is at ``out``.
        FileExistsError: an earlier output is at ``out`` without ``overwrite``, or another process created ``out``
            while this merge ran.
    """
    strategy = strategy if strategy is not None else Linear()
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy object, got {type(strategy).__name__}")
    options = MergeOptions(include=include, exclude=exclude, dtype=dtype, on_missing=on_missing,
                           on_missing_statistic=on_missing_statistic, output=output, rank=rank, shard_size=shard_size,
                           overwrite=overwrite, threads=threads, progress=progress, unmerged_from=unmerged_from,
                           memory_budget=memory_budget, files=files)
    if output == "peft":
        check_peft_request(strategy, out, rank, len(experts) if isinstance(experts, Sequence) else None)
    check_out_suffix(out, options)
    if group is not None and not dry_run:
        return _merge_distributed(experts, base, strategy, out, group, options)
    opened, base_expert = open_inputs(experts, base)
    if dry_run:
        return describe_plan(opened, base_expert, strategy, out, options)
    if isinstance(out, str) and is_url(out):
        # Object storage: write the output locally as usual, then upload it (entry point last; see storage).
        check_not_an_input(out, input_paths(opened, base_expert))
        with staged(out, overwrite=overwrite) as local:
            _merge_opened(opened, base_expert, strategy, local, options.replace(overwrite=False))
        return out  # type: ignore[return-value]
    return _merge_opened(opened, base_expert, strategy, out, options)


def _merge_opened(experts: list[Expert], base: Expert | None, strategy: Strategy, out: Any,
                  options: MergeOptions) -> Any:
    """:func:`merge` in this process, into a local ``out`` (a path, a module, or None), the inputs open."""
    started = time.perf_counter()
    plan = plan_merge(experts, base, strategy, options)
    provenance = _provenance(plan, strategy)
    inputs = input_paths(experts, base)
    with writing(out) if isinstance(out, (str, os.PathLike)) else contextlib.nullcontext():
        if options.output == "peft":
            writer: Writer = peft_writer(plan, strategy, out, provenance, options, inputs)
            names = set(writer.names_to_merge())  # type: ignore[attr-defined]
            jobs = [j for j in plan.jobs if j.name in names]
        else:
            writer = make_writer(out, plan.jobs, base or experts[0], provenance, options, inputs)
            jobs = plan.jobs
        try:
            run_jobs(plan, jobs, writer, options.threads or _default_threads(), options.progress,
                     options.memory_budget)
            result = writer.finish()
        except BaseException:
            writer.abort()
            raise
    log.info("merged %d tensors of %d experts with %s in %.2fs", len(jobs), len(experts), strategy.name,
             time.perf_counter() - started)
    return result


def _provenance(plan: Plan, strategy: Strategy) -> dict[str, Any]:
    return {
        "library": "lightning-merge",
        "version": __version__,
        "strategy": strategy.to_dict(),
        "prepared": plan.prepared.summary(),
        "experts": unique_names(plan.experts),
        "base": plan.base.name if plan.base else None,
    }


def _merge_distributed(experts: Any, base: Any, strategy: Strategy, out: Any, group: Any,
                       options: MergeOptions) -> Path:
    """:func:`merge` over the ranks of ``group`` (see :mod:`lightning_merge.engine.distributed`)."""
    from lightning_merge.engine.distributed import Distribution, PeerFailed

    output = options.output
    if not isinstance(out, (str, os.PathLike)) or is_url(out) or \
            Path(out).suffix not in (("",) if output == "peft" else ("", ".safetensors")):
        raise ValueError(
            f"group=: a distributed merge writes safetensors (a folder or a .safetensors file, or a PEFT adapter "
            f"folder) at a path every rank sees (one machine, or a shared filesystem), got out={out!r}; merge in one "
            "process for a .ckpt, a module, a state dict or a URL (or upload after)"
        )
    d = Distribution(group)
    started = time.perf_counter()
    writer: SharedOutput | None = None
    try:
        opened, base_expert = open_inputs(experts, base)
        plan = plan_merge(opened, base_expert, strategy, options, distribution=d)
        reference = base_expert or opened[0]
        provenance, inputs = _provenance(plan, strategy), input_paths(opened, base_expert)

        def make(attach: Path | None = None) -> SharedOutput:
            if output == "peft":
                return peft_writer(plan, strategy, out, provenance, options, inputs, attach=attach)
            return make_writer(out, plan.jobs, reference, provenance, options, inputs, attach=attach)

        if d.rank == 0:
            writer = make()
        tmp = d.exchange("output created", writer.tmp if d.rank == 0 else None)[0]
        if d.rank != 0:
            writer = make(attach=tmp)
        if output == "peft":
            writer.owned = d.owned  # the modules this rank factors from the adapters
            names = set(writer.names_to_merge())
            mine = [j for j in plan.jobs if j.name in d.owned and j.name in names]
        else:
            mine = [j for j in plan.jobs if j.name in d.owned]
        run_jobs(plan, mine, writer, options.threads or _default_threads(), options.progress, options.memory_budget)
        writer.close_shards()  # this rank's bytes are durable before rank 0 commits
        errors = d.exchange("tensors written", getattr(writer, "errors", None))
        if d.rank == 0:
            if output == "peft":
                for part in errors:
                    writer.errors.update(part)
                result = writer.commit()
            else:
                result = writer.finish()
        else:
            result = Path(out)
        d.exchange("committed")
    except BaseException as caught:
        err = output_error(out, caught) or caught  # a refused write names the output and what to do
        if writer is not None:
            if d.rank == 0:
                writer.abort()
            else:
                writer.release()
        if not isinstance(err, PeerFailed) and not d.announced:
            d.exchange("failed", error=err)  # raises err here, after telling every other rank
        if err is not caught:
            raise err from caught
        raise
    log.info("rank %d/%d merged %d of %d tensors with %s in %.2fs", d.rank, d.size, len(mine), len(plan.jobs),
             strategy.name, time.perf_counter() - started)
    return result


def prepare(
    experts: Sequence[Any],
    base: Any = None,
    strategy: Strategy | None = None,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    on_missing: str = "error",
    on_missing_statistic: str = "error",
) -> Prepared:
    """The strategy's first pass over these experts, without merging: what :func:`merge` would use (LiNeS' α,
    model-wide thresholds, Fisher norms), e.g. ``prepare(experts, base, LiNeS()).alpha``.

    Arguments as for :func:`merge`.

    Returns:
        The strategy's :class:`~lightning_merge.strategies.Prepared`.
    """
    strategy = strategy if strategy is not None else Linear()
    options = MergeOptions(include=include, exclude=exclude, on_missing=on_missing,
                           on_missing_statistic=on_missing_statistic)
    opened, base_expert = open_inputs(experts, base)
    return plan_merge(opened, base_expert, strategy, options).prepared


Unit = tuple[TensorJob, "tuple[int, int] | None", int, "Prepared | None"]


def job_units(plan: Plan, jobs: list[TensorJob], budget: int, workers: int, out_dtype: torch.dtype | None = None,
              ) -> list[Unit]:
    """The scheduler's work items: ``(job, rows, cost, prepared)``, a job whole (``rows`` None) or, when it is a copy
    or its strategy is :attr:`~lightning_merge.strategies.Strategy.row_local` (or has a
    :attr:`~lightning_merge.strategies.Strategy.row_pass`: then ``prepared`` is the chunk's, from
    :meth:`~lightning_merge.strategies.Strategy.prepare_rows`, run here, the tensors' passes side by side on
    ``workers`` threads) and it costs more than a worker's share of the
    budget, one item per row chunk (:func:`~lightning_merge.engine.schedule.row_chunks`), each costing at most
    :func:`~lightning_merge.engine.schedule.chunk_limit`. A cost counts what the job
    holds: for a merge, the strategy's :meth:`~lightning_merge.strategies.Strategy.tensor_working_set` float32 copies
    of its elements; for a copy, the input, its float32 check and the output."""
    strategy = plan.prepared.strategy
    per_worker = max(1, budget // max(1, workers))
    chunk = chunk_limit(budget, workers)
    units: list[Unit] = []
    passes: list[tuple[int, TensorJob, list[tuple[int, int]]]] = []  # (first unit, job, its chunks)
    for job in jobs:
        shape = job.spec.shape
        if job.action == "merge":
            per_element = 4.0 * strategy.tensor_working_set(plan.num_experts, job.name, tuple(shape))
            chunkable = strategy.row_local or strategy.row_pass
        elif job.action == "copy":
            per_element = 8.0 + (out_dtype or job.spec.dtype).itemsize
            chunkable = True
        else:
            per_element, chunkable = 8.0 * (len(plan.experts) + 1), False
        # a row-local job is split as soon as it would keep another from running beside it (its chunks are as cheap as
        # the whole); a row pass reads the tensor three more times, so that job is split only to fit the budget
        whole = per_worker if chunkable and not (job.action == "merge" and strategy.row_pass) else budget
        ranges = row_chunks(shape, per_element, whole, chunk) if chunkable else [(0, shape[0] if shape else 0)]
        if len(ranges) == 1:
            units.append((job, None, int(job.spec.numel * per_element), None))
            continue
        row_elements = job.spec.numel // shape[0]
        if job.action == "merge" and not strategy.row_local:
            passes.append((len(units), job, ranges))
        units.extend((job, r, int((r[1] - r[0]) * row_elements * per_element), None) for r in ranges)
    # the row passes (each reads its tensor chunk by chunk, one chunk held at a time) run side by side on the workers,
    # within the budget as the merges do; each chunk's prepared merge goes into its unit
    if not passes:
        return units
    costs = [max(units[first + k][2] for k in range(len(ranges))) for first, _, ranges in passes]

    def row_pass(item: tuple[int, TensorJob, list[tuple[int, int]]]) -> list[Prepared]:
        return list(strategy.prepare_rows(plan.prepared, plan, item[1].name, item[2]))

    done = bounded_map(row_pass, passes, costs, budget, workers=workers, desc="row passes", progress=False,
                       share_threads=True)
    for (first, _, _), prepared in zip(passes, done):
        for k, p in enumerate(prepared):
            job, rows, cost, _ = units[first + k]
            units[first + k] = (job, rows, cost, p)
    return units


class _Assembler:
    """Row chunks of a tensor gathered for a writer that takes whole tensors (a state dict, a module, a .ckpt): the
    output tensor is allocated at its first chunk and handed to the writer when its last one is in."""

    def __init__(self, writer: Writer, units: list[Unit]):
        import threading

        self.writer = writer
        self.lock = threading.Lock()
        self.left: dict[str, int] = {}
        for job, rows, _, _ in units:
            if rows is not None:
                self.left[job.name] = self.left.get(job.name, 0) + 1
        self.parts: dict[str, Tensor] = {}

    def write_rows(self, job: TensorJob, rows: tuple[int, int], value: Tensor) -> None:
        with self.lock:
            whole = self.parts.get(job.name)
            if whole is None:
                whole = self.parts[job.name] = torch.empty(job.spec.shape, dtype=value.dtype)
        whole[rows[0]:rows[1]].copy_(value)
        with self.lock:
            self.left[job.name] -= 1
            done = self.left[job.name] == 0
            if done:
                del self.parts[job.name]
        if done:
            self.writer.write(job.name, whole)


def run_jobs(plan: Plan, jobs: list[TensorJob], writer: Writer, threads: int, progress: bool | None,
             memory_budget: int | None = None) -> None:
    """Compute and write every job on ``threads`` workers within ``memory_budget`` bytes (see
    :mod:`lightning_merge.engine.schedule`), large row-local jobs in row chunks, with a progress bar."""
    budget = memory_budget or DEFAULT_MEMORY_BUDGET
    units = job_units(plan, jobs, budget, threads, writer.compute_dtype)
    write_rows = getattr(writer, "write_rows", None)
    assembler = None if write_rows is not None else _Assembler(writer, units)

    def work(unit: Unit) -> None:
        job, rows, _, prepared = unit
        value = compute(plan, job, writer.compute_dtype, rows, prepared)
        if rows is None:
            writer.write(job.name, value)
        elif write_rows is not None:
            write_rows(job.name, rows[0], value)
        else:
            assembler.write_rows(job, rows, value)

    sizes = [(u[0].spec.nbytes if u[1] is None else
              u[0].spec.nbytes // u[0].spec.shape[0] * (u[1][1] - u[1][0])) for u in units]
    # the jobs running side by side share the cores (one intra-op thread each on two cores, not two each: the many
    # small operations of a row chunk, on oversubscribed threads, wait on each other), where no output depends on the
    # thread count: a strategy merging entry by entry or with a row pass (every job of it is elementwise, or a copy);
    # another strategy's whole tensors keep every thread (an SVD's floats depend on the count)
    strategy = plan.prepared.strategy
    share = bool(strategy.row_local or strategy.row_pass)
    for _ in bounded_map(work, units, [u[2] for u in units], budget, workers=threads, sizes=sizes, desc="merging",
                         progress=progress, share_threads=share):
        pass


def compute(plan: Plan, job: TensorJob, dtype: torch.dtype | None = None,
            rows: tuple[int, int] | None = None, prepared: Prepared | None = None) -> Tensor:
    """One output tensor, or its ``rows`` (a row-local strategy's or a copy's): copied, checked equal, maxed, or
    merged by the prepared strategy (``prepared``: a row chunk's, else the plan's; float32 throughout; cast once at
    the end to the job's dtype, or ``dtype``)."""
    name, out_dtype = job.name, dtype or job.spec.dtype
    shape = job.spec.shape if rows is None else (rows[1] - rows[0], *job.spec.shape[1:])
    if job.action == "copy":
        return cast_checked(job.source.tensor(name, rows), out_dtype, name, DTYPE_HINT)
    if job.action in ("equal", "max"):
        holders = ([plan.base] if plan.base is not None and name in plan.base else []) + [
            e for e, present in zip(plan.experts, job.present) if present
        ]
        values = [h.tensor(name) for h in holders]
        if job.action == "max":
            return torch.stack(values).amax(dim=0)
        for holder, value in zip(holders[1:], values[1:]):
            if not torch.equal(value, values[0]):
                what = "complex" if value.is_complex() else "non-floating"
                raise ValueError(
                    f"{what} tensor '{name}' differs between '{holders[0].name}' and '{holder.name}'; such "
                    f"tensors (indices, position ids, complex buffers) are copied, not merged, so they must be equal. "
                    f"Exclude it or fix the expert"
                )
        return values[0]
    prepared = prepared or plan.prepared
    strategy = prepared.strategy
    wants_base = strategy.needs_base or strategy.uses_base or not all(job.present)
    base = plan.base_tensor(name, rows) if wants_base else None
    tensors = plan.expert_tensors(name, base, rows)
    merged = prepared.merge_tensor(name, base, tensors, plan.stats(name) if rows is None else plan.stats(name, rows))
    if tuple(merged.shape) != tuple(shape):
        raise RuntimeError(
            f"strategy {strategy.name!r} returned shape {list(merged.shape)} for tensor '{name}', "
            f"expected {list(shape)}"
        )
    magnitude = largest_magnitude(merged)  # one reduction: finiteness here, the output dtype's range in the cast
    if not math.isfinite(magnitude):
        raise ValueError(
            f"strategy {strategy.name!r} produced NaN or infinite values for tensor '{name}' from finite inputs; "
            f"check its arguments ({strategy!r})"
        )
    return cast_checked(merged, out_dtype, name, DTYPE_HINT, magnitude=magnitude)


__all__ = [
    "Plan",
    "TensorJob",
    "build_jobs",
    "compute",
    "merge",
    "open_inputs",
    "parse_dtype",
    "plan_merge",
    "prepare",
    "run_jobs",
    "unique_names",
]
