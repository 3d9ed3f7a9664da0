"""The streaming merge driver: for each tensor name, read base + experts, call the prepared strategy, write, free.

Peak memory stays near one tensor × (N + 2) per worker thread, not N models. Everything that can be checked is
checked before the first tensor is merged: names, shapes and dtypes (headers only), the statistics the strategy
needs, the output path, the strategy's algebra for the chosen output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge._version import __version__
from lightning_merge.engine.writers import (
    FILE_SUFFIXES,
    CheckpointWriter,
    DictWriter,
    ModuleWriter,
    PeftWriter,
    SafetensorsWriter,
    Writer,
    parse_size,
)
from lightning_merge.files.atomic import output_error, writing
from lightning_merge.files.finite import cast_checked, largest_magnitude
from lightning_merge.files.outputs import check_not_an_input, check_output
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.files.remote import is_url, redact, staged
from lightning_merge.formats.sidecar import GRAM, MissingStatistic, StatisticsError
from lightning_merge.sources.distcp import checkpoint_template
from lightning_merge.sources.expert import Expert, TensorSpec, as_expert
from lightning_merge.strategies.base import Prepared, Strategy
from lightning_merge.strategies.linear import Linear

log = logging.getLogger("lightning_merge")

ON_MISSING = ("error", "union", "intersection", "base")
ON_MISSING_STATISTIC = ("error", "uniform")
DTYPE_HINT = "dtype= / --dtype"  # how a merge's output dtype is chosen, for messages
OUTPUTS = (None, "peft")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``torch.bfloat16``... → a floating torch dtype (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{what} {dtype} is not a floating dtype; use one of {', '.join(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"{what} {dtype!r} is not a floating dtype; use one of {', '.join(DTYPES)}") from None


@dataclass
class TensorJob:
    """What the engine does with one output tensor."""

    name: str
    action: str  # "merge", "copy", "equal" (non-float: must agree), "max" (num_batches_tracked)
    spec: TensorSpec  # output shape and dtype
    present: list[bool] = field(default_factory=list)  # which experts hold the tensor
    source: Expert | None = None  # for "copy"


class Plan:
    """What a merge will do, handed to :meth:`Strategy.prepare`: names, shapes, experts; reads only on request. It
    implements the strategies' :class:`~lightning_merge.strategies.plan.MergePlan` protocol.

    Attributes:
        names: the tensors that go through the strategy, in order.
        experts: the experts, in order.
        base: the base, or None.
        prepared: the strategy's :class:`~lightning_merge.strategies.Prepared` once :func:`plan_merge` made it.
    """

    def __init__(self, experts: list[Expert], base: Expert | None, jobs: list[TensorJob], statistic_reader: Any = None):
        self.experts = experts
        self.base = base
        self.jobs = jobs
        self._by_name = {job.name: job for job in jobs}
        self.names = [job.name for job in jobs if job.action == "merge"]
        self._statistic_reader = statistic_reader
        self.prepared: Prepared | None = None
        self.progress: bool | None = None
        self.distribution: Any = None  # a Distribution when the merge is split over ranks

    def _own(self, desc: str) -> Iterator[str]:
        from lightning_merge.files.progress import track

        names = self.names if self.distribution is None else [n for n in self.names if n in self.distribution.owned]
        per = self.num_experts + (self.base is not None)
        return track(names, (self.spec(n).nbytes * per for n in names), desc, self.progress)

    def passes(self, desc: str) -> Iterator[str]:
        """The merged tensors' names for a first pass over the model, with a progress bar (counted in the bytes of
        the experts' tensors read). In a distributed merge a pass must go through :meth:`map` or :meth:`sum`
        instead (each rank sees only its tensors), and this raises."""
        if self.distribution is not None:
            raise RuntimeError(
                f"{desc}: in a distributed merge (group=...) a first pass over the model must use plan.map() or "
                "plan.sum(), which combine the ranks' results; plan.passes() sees one rank's tensors only"
            )
        return self._own(desc)

    def map(self, fn: Callable[[str], Any], desc: str) -> dict[str, Any]:
        """``{name: fn(name)}`` for every merged tensor, in plan order (a first pass: ``fn`` reads what it needs).
        Split over the ranks in a distributed merge; reduce the values in this order to get one process's floats."""
        if self.distribution is None:
            return {n: fn(n) for n in self._own(desc)}
        return self.distribution.gather_map(self.names, fn, desc)

    def sum(self, fn: Callable[[str], Tensor], desc: str, zero: Tensor) -> Tensor:
        """Σ over the merged tensors of ``fn(name)``, for integer tensors (counts, histograms), whose sums are exact
        in any order: split over the ranks in a distributed merge."""
        total = zero.clone()
        if self.distribution is None:
            for n in self._own(desc):
                total += fn(n)
            return total
        def accumulate() -> None:
            for n in self._own(desc):
                total.add_(fn(n))

        self.distribution.attempt(desc, accumulate)
        out = zero.clone()
        for part in self.distribution.exchange(desc, total):
            out += part
        return out

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def spec(self, name: str) -> TensorSpec:
        return self._by_name[name].spec

    def base_tensor(self, name: str) -> Tensor | None:
        """The base's tensor in float32 (None without a base or where the base lacks it)."""
        if self.base is None or name not in self.base:
            return None
        return self.base.float32(name)

    def expert_tensors(self, name: str, base: Tensor | None = None) -> list[Tensor]:
        """Every expert's tensor in float32; an expert lacking it (``on_missing`` union/base) gets the base's."""
        job = self._by_name[name]
        if base is None and not all(job.present):
            base = self.base_tensor(name)
        return [e.float32(name) if present else base for e, present in zip(self.experts, job.present)]

    def task_vectors(self, name: str) -> Tensor:
        """Stacked task vectors ``(N, *shape)`` in float32 (needs a base)."""
        base = self.base_tensor(name)
        if base is None:
            raise ValueError(f"task vectors of '{name}' need a base model")
        return torch.stack([t - base for t in self.expert_tensors(name, base)])

    def stats(self, name: str) -> list[dict[str, Tensor]]:
        """Every expert's merge-ready statistics for tensor ``name``, as ``merge_tensor`` receives them."""
        return self._statistic_reader(name)

    def statistics(self, name: str, kind: str) -> list[Tensor]:
        """Every expert's merge-ready statistic of ``kind`` for tensor ``name``."""
        return [s[kind] for s in self._statistic_reader(name)]


def plan_merge(
    experts: list[Expert],
    base: Expert | None,
    strategy: Strategy,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    on_missing: str = "error",
    on_missing_statistic: str = "error",
    progress: bool | None = None,
    distribution: Any = None,
) -> Plan:
    """Everything before the first tensor is merged: the tensor jobs, the check that every expert has the
    statistics the strategy requires, and the strategy's first pass (its :class:`Prepared`, in ``plan.prepared``).

    Arguments as for :func:`merge`, with experts and base already opened; ``distribution``: a
    :class:`~lightning_merge.engine.distributed.Distribution` to split the first pass (and the merge) over.
    """
    if strategy.needs_base and base is None:
        raise ValueError(f"strategy {strategy.name!r} needs a base model (base=...); Linear does not")
    strategy.check_num_experts(len(experts))
    jobs = build_jobs(experts, base, include=include, exclude=exclude, dtype=dtype, on_missing=on_missing)
    reader = _StatisticReader(strategy, experts, on_missing_statistic, {j.name: j for j in jobs})
    reader.check()
    plan = Plan(experts, base, jobs, reader)
    plan.progress = progress
    if distribution is not None:
        distribution.assign([(j.name, j.spec.nbytes) for j in jobs])
        plan.distribution = distribution
    plan.prepared = strategy.prepare(plan)
    if not isinstance(plan.prepared, Prepared):
        raise TypeError(f"{type(strategy).__name__}.prepare must return a Prepared object, got {plan.prepared!r}")
    return plan


def _glob_match(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _ordered_union(lists: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for names in lists:
        for n in names:
            seen.setdefault(n, None)
    return list(seen)


def build_jobs(
    experts: list[Expert],
    base: Expert | None,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    on_missing: str = "error",
) -> list[TensorJob]:
    """Check names, shapes and dtypes of every tensor (headers only) and decide what to do with each.

    Raises:
        ValueError: a tensor some experts lack (with ``on_missing="error"``), a shape mismatch, or a dtype
            mismatch without an explicit output ``dtype``; the message names the tensor and the experts.
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}, got {on_missing!r}")
    if on_missing == "base" and base is None:
        raise ValueError("on_missing='base' needs a base model")
    expert_sets = [set(e.names()) for e in experts]
    sources = ([base] if base is not None else []) + experts
    if on_missing == "base":
        names = base.names()
    elif on_missing == "intersection":
        names = [n for n in _ordered_union(s.names() for s in sources) if all(n in s for s in sources)]
    else:
        names = _ordered_union(s.names() for s in sources)
        if on_missing == "error":
            for name in names:
                lacking = [s.name for s in sources if name not in s]
                if lacking:
                    holders = [s.name for s in sources if name in s]
                    raise ValueError(
                        f"tensor '{name}' is in {', '.join(map(repr, holders))} but not in "
                        f"{', '.join(map(repr, lacking))}; pass on_missing='base' (--on-missing base) to keep the "
                        f"base's value, 'union' to keep every tensor, or 'intersection' to drop such tensors"
                    )
    if not names:
        raise ValueError("the experts have no tensor in common to merge (check prefix= and on_missing)")

    jobs = []
    for name in names:
        holders = [s for s in sources if name in s]
        specs = [(s, s.spec(name)) for s in holders]
        ref_expert, ref = specs[0]
        for other, spec in specs[1:]:
            if spec.shape != ref.shape:
                raise ValueError(
                    f"tensor '{name}' has shape {list(ref.shape)} in '{ref_expert.name}' but {list(spec.shape)} in "
                    f"'{other.name}': the experts do not share an architecture"
                )
        floating = [spec.is_floating for _, spec in specs]
        if any(floating) != all(floating):
            raise ValueError(f"tensor '{name}' is floating point in some experts and not in others")
        present = [name in s for s in expert_sets]
        if not ref.is_floating:
            action = "max" if name.endswith("num_batches_tracked") else "equal"
            jobs.append(TensorJob(name, action, ref, present))
            continue
        dtypes = {spec.dtype for _, spec in specs}
        if len(dtypes) > 1 and dtype is None:
            listing = ", ".join(f"{s.name}: {str(spec.dtype).replace('torch.', '')}" for s, spec in specs)
            raise ValueError(
                f"tensor '{name}' has different dtypes ({listing}); pass dtype= (--dtype) to choose the output dtype"
            )
        out_spec = TensorSpec(ref.shape, dtype or ref.dtype)
        excluded = (include is not None and not _glob_match(name, include)) or _glob_match(name, exclude)
        if excluded:
            jobs.append(TensorJob(name, "copy", out_spec, present, source=holders[0]))
        elif not all(present) and (base is None or name not in base):
            # Only some experts have it and there is no base value to stand in: keep the first expert's.
            log.warning(
                "tensor '%s' is only in some experts and not in the base: copied from '%s'", name, holders[0].name
            )
            jobs.append(TensorJob(name, "copy", out_spec, present, source=holders[0]))
        else:
            jobs.append(TensorJob(name, "merge", out_spec, present))
    _check_patterns(names, jobs, include, exclude)
    return jobs


def _check_patterns(names: Sequence[str], jobs: Sequence[TensorJob], include: Sequence[str] | str | None,
                    exclude: Sequence[str] | str | None) -> None:
    """A pattern that matches no tensor is a typo or a wrong prefix (what it was meant to select would be merged, or
    left out, without a word); patterns that leave nothing to merge would write a copy of the base: both refused."""
    sample = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns or ()):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{option} pattern {pattern!r} matches no tensor (tensors are named like {sample}); patterns are "
                    "shell globs over whole names (use 'layers.0.*', not 'layers.0'), after any prefix= is removed"
                )
    if (include is not None or exclude) and not any(job.action == "merge" for job in jobs):
        raise ValueError(
            f"include={include!r} and exclude={exclude!r} leave no floating-point tensor to merge, so the output "
            f"would be a copy of the base (tensors are named like {sample}); widen include or narrow exclude"
        )


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
    progress: bool | None = None,
    rank: int | None = None,
    dry_run: bool = False,
    group: Any = None,
) -> dict[str, Tensor] | Path | nn.Module | dict[str, Any]:
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
        threads: worker threads over tensors (default: up to 2). Whatever the count, the tensors being merged at
            once hold at most as many elements as the largest tensor, so threads do not raise peak memory.
        progress: show a progress bar (default: when stderr is a terminal).
        rank: with ``output="peft"``: None writes the exact concatenation of the adapters' factors (rank Σrᵢ; for
            strategies linear in the experts, ``strategy.linear``); an integer writes a truncated SVD of each
            merged ΔW at that rank and records the relative reconstruction error per module.
        dry_run: check everything that needs no tensor data (names, shapes, dtypes, statistics present, the output
            path) and return the plan instead of merging: the tensors to merge and copy, the experts, the strategy,
            the statistics found, the output's size.
        group: split the merge over the ranks of a ``torch.distributed`` process group (``"world"`` for the default
            group, as ``torchrun`` sets up; see :mod:`lightning_merge.engine.distributed`). Every rank calls ``merge``
            with the same arguments; each reads and writes only its tensors (balanced by bytes) into the shared
            output, which must be a safetensors folder or file, or a PEFT adapter folder (``output="peft"``), at a
            path every rank sees. The output is bit-identical to one process's (given the same torch thread count);
            a rank that fails makes every rank raise, and nothing is written.

    Returns:
        The merged state dict (``out=None``), the written path, or the module; with ``dry_run``, the plan.

    Raises:
        ValueError: anything that makes the merge impossible, before any tensor is merged: the message names the
            expert, tensor, statistic or argument and says what to do.
        ForeignOutput: something lightning-merge did not write is at ``out``.
        FileExistsError: an earlier output is at ``out`` without ``overwrite``, or another process created ``out``
            while this merge ran.
    """
    started = time.perf_counter()
    strategy = strategy if strategy is not None else Linear()
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy object, got {type(strategy).__name__}")
    if on_missing_statistic not in ON_MISSING_STATISTIC:
        raise ValueError(
            f"on_missing_statistic must be one of {', '.join(ON_MISSING_STATISTIC)}, got {on_missing_statistic!r}"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be None or 'peft', got {output!r}")
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}, got {on_missing!r}")
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if output == "peft":
        _check_peft_request(strategy, out, rank, len(experts) if isinstance(experts, Sequence) else None)
    elif rank is not None:
        raise ValueError("rank= applies to output='peft' only (the rank of the adapter written)")
    if isinstance(out, (str, os.PathLike)) and output is None:
        suffix = Path(out).suffix
        if suffix and suffix not in FILE_SUFFIXES and suffix in (".pt", ".pth", ".bin", ".pkl", ".json"):
            raise ValueError(
                f"out='{out}': {suffix} is not an output format; use a folder (sharded safetensors), a .safetensors "
                "file or a .ckpt Lightning checkpoint"
            )

    if group is not None and not dry_run:
        return _merge_distributed(experts, base, strategy, out, group, include=include, exclude=exclude,
                                  dtype=out_dtype, on_missing=on_missing, on_missing_statistic=on_missing_statistic,
                                  shard_bytes=shard_bytes, overwrite=overwrite, threads=threads, progress=progress,
                                  output=output, rank=rank)
    experts, base_expert = open_inputs(experts, base)
    if isinstance(out, str) and is_url(out) and not dry_run:
        # Object storage: write the output locally as usual, then upload it (entry point last; see storage).
        check_not_an_input(out, _input_paths(experts, base_expert))
        with staged(out, overwrite=overwrite) as local:
            merge(experts, base_expert, strategy, local, output=output, include=include, exclude=exclude,
                  dtype=dtype, on_missing=on_missing, on_missing_statistic=on_missing_statistic,
                  shard_size=shard_size, threads=threads, progress=progress, rank=rank)
        return out  # type: ignore[return-value]
    if dry_run:
        return describe_plan(experts, base_expert, strategy, out, output=output, rank=rank, include=include,
                             exclude=exclude, dtype=out_dtype, on_missing=on_missing,
                             on_missing_statistic=on_missing_statistic, overwrite=overwrite)
    plan = plan_merge(experts, base_expert, strategy, include=include, exclude=exclude,
                      dtype=torch.float32 if output == "peft" else out_dtype,
                      on_missing=on_missing, on_missing_statistic=on_missing_statistic, progress=progress)
    provenance = _provenance(plan, strategy)
    inputs = _input_paths(experts, base_expert)
    with writing(out) if isinstance(out, (str, os.PathLike)) else contextlib.nullcontext():
        if output == "peft":
            writer: Writer = _peft_writer(plan, strategy, out, rank, provenance, overwrite, inputs)
            names = set(writer.names_to_merge())  # type: ignore[attr-defined]
            jobs = [j for j in plan.jobs if j.name in names]
        else:
            writer = make_writer(out, plan.jobs, base_expert or experts[0], provenance, shard_bytes, overwrite, inputs)
            jobs = plan.jobs
        try:
            run_jobs(plan, jobs, writer, threads or _default_threads(), progress)
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


def _input_paths(experts: list[Expert], base: Expert | None) -> list[Path | str]:
    """Every file, folder and URL the merge reads (weights, sidecars, adapters' bases): the output must be none."""
    return [s for e in [*experts, *([base] if base is not None else [])] for s in e.sources()]


def _merge_distributed(experts: Any, base: Any, strategy: Strategy, out: Any, group: Any, *, include: Any,
                       exclude: Any, dtype: torch.dtype | None, on_missing: str, on_missing_statistic: str,
                       shard_bytes: int, overwrite: bool, threads: int | None, progress: bool | None,
                       output: str | None, rank: int | None = None) -> Path:
    """:func:`merge` over the ranks of ``group`` (see :mod:`lightning_merge.engine.distributed`)."""
    from lightning_merge.engine.distributed import Distribution, PeerFailed

    if not isinstance(out, (str, os.PathLike)) or is_url(out) or \
            Path(out).suffix not in (("",) if output == "peft" else ("", ".safetensors")):
        raise ValueError(
            f"group=: a distributed merge writes safetensors (a folder or a .safetensors file, or a PEFT adapter "
            f"folder) at a path every rank sees (one machine, or a shared filesystem), got out={out!r}; merge in one "
            "process for a .ckpt, a module, a state dict or a URL (or upload after)"
        )
    d = Distribution(group)
    started = time.perf_counter()
    writer: Any = None
    try:
        opened, base_expert = open_inputs(experts, base)
        plan = plan_merge(opened, base_expert, strategy, include=include, exclude=exclude,
                          dtype=torch.float32 if output == "peft" else dtype, on_missing=on_missing,
                          on_missing_statistic=on_missing_statistic, progress=progress, distribution=d)
        reference = base_expert or opened[0]
        provenance, inputs = _provenance(plan, strategy), _input_paths(opened, base_expert)

        def make(attach: Path | None = None) -> Any:
            if output == "peft":
                return _peft_writer(plan, strategy, out, rank, provenance, overwrite, inputs, attach=attach)
            return make_writer(out, plan.jobs, reference, provenance, shard_bytes, overwrite, inputs, attach=attach)

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
        run_jobs(plan, mine, writer, threads or _default_threads(), progress)
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
    """
    strategy = strategy if strategy is not None else Linear()
    opened, base_expert = open_inputs(experts, base)
    plan = plan_merge(opened, base_expert, strategy, include=include, exclude=exclude, on_missing=on_missing,
                      on_missing_statistic=on_missing_statistic)
    return plan.prepared


def describe_plan(experts: list[Expert], base: Expert | None, strategy: Strategy, out: Any, *, output: str | None,
                  rank: int | None, include: Any, exclude: Any, dtype: torch.dtype | None, on_missing: str,
                  on_missing_statistic: str, overwrite: bool) -> dict[str, Any]:
    """What :func:`merge` would do, from headers alone (``dry_run=True``): nothing is read or written."""
    if strategy.needs_base and base is None:
        raise ValueError(f"strategy {strategy.name!r} needs a base model (base=...); Linear does not")
    strategy.check_num_experts(len(experts))
    jobs = build_jobs(experts, base, include=include, exclude=exclude, dtype=dtype, on_missing=on_missing)
    _StatisticReader(strategy, experts, on_missing_statistic, {j.name: j for j in jobs}).check()
    if isinstance(out, (str, os.PathLike)):
        check_output(out, overwrite, inputs=_input_paths(experts, base),
                     folder=Path(out).suffix not in FILE_SUFFIXES or output == "peft")
    actions: dict[str, int] = {}
    for job in jobs:
        actions[job.action] = actions.get(job.action, 0) + 1
    statistics = [{kind: (e.statistics.resolve_kind(kind) if e.has_statistic(kind) else None)
                   for kind in strategy.requires} for e in experts]
    return {
        "experts": unique_names(experts),
        "base": base.name if base is not None else None,
        "strategy": strategy.to_dict(),
        "global_pass": strategy.global_pass,
        "tensors": {"merge": actions.get("merge", 0), "copy": actions.get("copy", 0),
                    "non_floating": actions.get("equal", 0) + actions.get("max", 0)},
        "parameters": sum(j.spec.numel for j in jobs),
        "statistics": statistics,
        "output": None if out is None or isinstance(out, nn.Module) else redact(out),
        "output_kind": "peft adapter" if output == "peft" else ("module" if isinstance(out, nn.Module) else
                                                                  "state dict" if out is None else "files"),
        "output_bytes": sum(j.spec.nbytes for j in jobs) if output != "peft" else None,
        "output_exists": isinstance(out, (str, os.PathLike)) and (remote_exists(out) if is_url(out) else
                                                                   os.path.lexists(out)),
    }


def unique_names(experts: Sequence[Expert]) -> list[str]:
    """The experts' names, made unique where several share one (``name#i``, i the expert's index)."""
    names = [e.name for e in experts]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _check_peft_request(strategy: Strategy, out: Any, rank: int | None, num_experts: int | None) -> None:
    """What can be refused about an adapter output from the strategy's configuration alone."""
    if out is None or isinstance(out, nn.Module):
        raise ValueError("output='peft' needs out= a folder to write the adapter into")
    if rank is None and not strategy.linear:
        raise ValueError(
            f"strategy {strategy.name!r} is not linear in the experts (its merge is not Σ cᵢ·ΔWᵢ), so no exact "
            "adapter exists: pass rank= for a truncated-SVD adapter"
        )
    if num_experts:
        form = strategy.linear_form(num_experts)
        if form is not None and not form.preserves_base:
            raise ValueError(
                f"{strategy!r} scales the base itself (coefficients sum to {form.base + sum(form.experts):g}, not 1): "
                "an adapter holds only a change to the base; use normalize=True, weights that sum to 1, or "
                "TaskArithmetic"
            )


def _peft_writer(plan: Plan, strategy: Strategy, out: Any, rank: int | None, provenance: dict,
                 overwrite: bool, inputs: list, attach: Path | None = None) -> PeftWriter:
    plain = [e.name for e in plan.experts if e.lora is None]
    if plain:
        raise ValueError(f"output='peft' needs LoRA adapter experts; '{plain[0]}' is not one")
    if plan.base is None:
        raise ValueError("output='peft' needs base= the model the adapters adapt")
    for name in plan.names:
        form = plan.prepared.linear_form(name)
        if form is not None and not form.preserves_base:
            raise ValueError(f"{strategy!r} scales the base at '{name}': an adapter holds only a change to the base")
    return PeftWriter(Path(out), [e.lora for e in plan.experts], plan.base, rank=rank, prepared=plan.prepared,
                      provenance=provenance, overwrite=overwrite, inputs=inputs, attach=attach)


def make_writer(
    out: Any, jobs: list[TensorJob], reference: Expert, provenance: dict, shard_size: int, overwrite: bool,
    inputs: Sequence[Path] = (), attach: Path | None = None,
) -> Writer:
    """The writer ``out`` asks for (checked now: path, template checkpoint). ``attach``: the temporary output another
    rank of a distributed merge created (safetensors outputs only)."""
    if out is None:
        return DictWriter([j.name for j in jobs])
    if isinstance(out, nn.Module):
        return ModuleWriter(out, [j.name for j in jobs])
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be None, a path or an nn.Module, got {type(out).__name__}")
    path = Path(out)
    if path.suffix == ".ckpt":
        template = checkpoint_template(reference.path)  # a .ckpt file, or a distributed checkpoint's meta.pt
        return CheckpointWriter(path, template=template, prefix=reference.prefix, provenance=provenance,
                                overwrite=overwrite, trust_checkpoint=reference.trust_checkpoint, inputs=inputs)
    entries = [(j.name, j.spec) for j in jobs]
    if path.suffix == ".safetensors":
        return SafetensorsWriter(path, entries, provenance=provenance, overwrite=overwrite, single_file=True,
                                 inputs=inputs, attach=attach)
    source = reference.lora_base if reference.lora is not None else reference
    copy_from = source.path if source is not None and source.path is not None and source.path.is_dir() else None
    return SafetensorsWriter(path, entries, shard_size=shard_size, copy_from=copy_from, provenance=provenance,
                             overwrite=overwrite, inputs=inputs, attach=attach)


class _StatisticReader:
    """Reads the statistics a strategy requires, with the ``on_missing_statistic`` policy. Only a statistic that is
    absent falls under the policy; one that is there but wrong (shape, NaN, negative) is always an error."""

    def __init__(self, strategy: Strategy, experts: list[Expert], policy: str, jobs: dict[str, TensorJob]):
        self.kinds = tuple(strategy.requires)
        self.experts = experts
        self.policy = policy
        self.jobs = jobs
        self.uniform_experts: set[int] = set()

    def check(self) -> None:
        for kind in self.kinds:
            for i, expert in enumerate(self.experts):
                if expert.has_statistic(kind):
                    continue
                if self.policy == "error":
                    raise StatisticsError(
                        f"expert '{expert.name}' has no {kind!r} statistics, which the strategy needs; capture them "
                        f"with CurvatureCapture, pass statistics=..., or pass on_missing_statistic='uniform' "
                        f"(--on-missing-statistic uniform) to weigh this expert uniformly"
                    )
                log.warning(
                    "expert '%s' has no %r statistics: using uniform weights for it (on_missing_statistic='uniform')",
                    expert.name,
                    kind,
                )
                self.uniform_experts.add(i)
            if kind == "fisher":
                used = {e.name: e.statistics.resolve_kind("fisher") for i, e in enumerate(self.experts)
                        if i not in self.uniform_experts}
                if len(set(used.values())) > 1:
                    listing = ", ".join(f"'{n}': {k}" for n, k in used.items())
                    log.warning(
                        "the experts' Fisher statistics come from different estimators (%s); each estimates the "
                        "per-example Fisher with its own bias, so their weights are only roughly comparable: pass "
                        "estimator= to the strategy to use one estimator for all", listing)

    def __call__(self, name: str) -> list[dict[str, Tensor]]:
        if not self.kinds:
            return [{} for _ in self.experts]
        job = self.jobs[name]
        out: list[dict[str, Tensor | None]] = []
        missing: list[tuple[int, str]] = []
        for i, expert in enumerate(self.experts):
            entry: dict[str, Tensor | None] = {}
            for kind in self.kinds:
                if i in self.uniform_experts or not job.present[i]:
                    entry[kind] = None
                    if not job.present[i] and i not in self.uniform_experts:
                        missing.append((i, kind))
                    continue
                try:
                    entry[kind] = expert.statistic(name, kind)
                except MissingStatistic:
                    entry[kind] = None
                    missing.append((i, kind))
            out.append(entry)
        if missing and len({i for i, _ in missing}) < len(self.experts) and self.policy == "error":
            i, kind = missing[0]
            why = "lacks the tensor itself" if not job.present[i] else "has none for it"
            raise StatisticsError(
                f"expert '{self.experts[i].name}' {why} ({kind!r} statistic of tensor '{name}') while other experts "
                f"have one; pass on_missing_statistic='uniform' to weigh it uniformly there"
            )
        shape = job.spec.shape
        for entry in out:
            for kind, value in entry.items():
                # No expert has it (buffers, frozen tensors), or the uniform fallback: ones of the tensor's shape.
                # A Gram matrix is not of the tensor's shape and has no uniform value: it stays None, and the
                # strategy (RegMean) says what None means.
                if value is None and kind != GRAM:
                    entry[kind] = torch.ones(shape, dtype=torch.float32)
        return out  # type: ignore[return-value]


def run_jobs(plan: Plan, jobs: list[TensorJob], writer: Writer, threads: int, progress: bool | None) -> None:
    """Compute and write every job, ``threads`` tensors at a time within the memory bound, with a progress bar."""
    from lightning_merge.files.progress import Progress

    bar = Progress("merging", sum(job.spec.nbytes for job in jobs), progress)

    def work(job: TensorJob) -> None:
        writer.write(job.name, compute(plan, job, writer.compute_dtype))

    try:
        if threads <= 1:
            for job in jobs:
                work(job)
                bar.update(job.spec.nbytes)
            return
        # Memory bound: the elements in flight never exceed the largest tensor's, so small tensors are merged
        # `threads` at a time while two of the largest (embeddings, heads) never are.
        budget = max((job.spec.numel for job in jobs), default=0)
        pending: dict[Future, TensorJob] = {}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lightning-merge") as pool:
            try:
                for job in jobs:
                    size = job.spec.numel
                    while pending and (len(pending) >= threads or
                                       sum(j.spec.numel for j in pending.values()) + size > budget):
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            finished = pending.pop(f)
                            f.result()
                            bar.update(finished.spec.nbytes)
                    pending[pool.submit(work, job)] = job
                for f, job in list(pending.items()):
                    f.result()
                    bar.update(job.spec.nbytes)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        bar.close()


def compute(plan: Plan, job: TensorJob, dtype: torch.dtype | None = None) -> Tensor:
    """One output tensor: copied, checked equal, maxed, or merged by the prepared strategy (float32 throughout; cast
    once at the end to the job's dtype, or ``dtype``)."""
    name, out_dtype = job.name, dtype or job.spec.dtype
    if job.action == "copy":
        return cast_checked(job.source.tensor(name), out_dtype, name, DTYPE_HINT)
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
    prepared = plan.prepared
    strategy = prepared.strategy
    wants_base = strategy.needs_base or strategy.uses_base or not all(job.present)
    base = plan.base_tensor(name) if wants_base else None
    tensors = plan.expert_tensors(name, base)
    merged = prepared.merge_tensor(name, base, tensors, plan.stats(name))
    if tuple(merged.shape) != job.spec.shape:
        raise RuntimeError(
            f"strategy {strategy.name!r} returned shape {list(merged.shape)} for tensor '{name}', "
            f"expected {list(job.spec.shape)}"
        )
    magnitude = largest_magnitude(merged)  # one reduction: finiteness here, the output dtype's range in the cast
    if not math.isfinite(magnitude):
        raise ValueError(
            f"strategy {strategy.name!r} produced NaN or infinite values for tensor '{name}' from finite inputs; "
            f"check its arguments ({strategy!r})"
        )
    return cast_checked(merged, out_dtype, name, DTYPE_HINT, magnitude=magnitude)


__all__ = ["Plan", "TensorJob", "build_jobs", "merge", "open_inputs", "parse_dtype", "plan_merge", "prepare"]
