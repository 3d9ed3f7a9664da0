"""The streaming merge driver: for each tensor name, read base + experts, call the strategy, write, free.

Peak memory stays near one tensor × (N + 2) per worker thread, not N models.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.experts import Expert, TensorSpec, as_expert
from lightning_merge.stats import StatisticsError
from lightning_merge.strategies import Linear, Strategy
from lightning_merge.writers import (
    CheckpointWriter,
    DictWriter,
    ModuleWriter,
    SafetensorsWriter,
    Writer,
    parse_size,
)

log = logging.getLogger("lightning_merge")

ON_MISSING = ("error", "union", "intersection", "base")
ON_MISSING_STATISTIC = ("error", "uniform")
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
    if dtype is None or isinstance(dtype, torch.dtype):
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


class MergePlan:
    """What a merge will do, handed to :meth:`Strategy.prepare`: names, shapes, experts; reads only on request.

    Attributes:
        names: the tensors that go through ``merge_tensor``, in order.
        experts: the experts, in order.
        base: the base, or None.
    """

    def __init__(self, experts: list[Expert], base: Expert | None, jobs: list[TensorJob], statistic_reader: Any = None):
        self.experts = experts
        self.base = base
        self.jobs = jobs
        self._by_name = {job.name: job for job in jobs}
        self.names = [job.name for job in jobs if job.action == "merge"]
        self._statistic_reader = statistic_reader

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def spec(self, name: str) -> TensorSpec:
        return self._by_name[name].spec

    def base_tensor(self, name: str) -> Tensor | None:
        """The base's tensor in float32 (None without a base or where the base lacks it)."""
        if self.base is None or name not in self.base:
            return None
        return self.base.tensor(name).to(torch.float32)

    def expert_tensors(self, name: str, base: Tensor | None = None) -> list[Tensor]:
        """Every expert's tensor in float32; an expert lacking it (``on_missing`` union/base) gets the base's."""
        job = self._by_name[name]
        if base is None and not all(job.present):
            base = self.base_tensor(name)
        return [e.tensor(name).to(torch.float32) if present else base for e, present in zip(self.experts, job.present)]

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
) -> MergePlan:
    """Everything before the first tensor is merged: the tensor jobs, the check that every expert has the
    statistics the strategy requires, and the strategy's first pass (:meth:`Strategy.prepare`).

    Arguments as for :func:`merge`, with experts and base already opened.
    """
    jobs = build_jobs(experts, base, include=include, exclude=exclude, dtype=dtype, on_missing=on_missing)
    reader = _StatisticReader(strategy, experts, on_missing_statistic)
    reader.check()
    plan = MergePlan(experts, base, jobs, reader)
    strategy.prepare(plan)
    return plan


def _open_expert(obj: Any, base: Any, index: int) -> Expert:
    """A path to a PEFT adapter folder opens over ``base``; everything else as :func:`as_expert`."""
    if isinstance(obj, (str, os.PathLike)) and (Path(obj) / "adapter_config.json").exists():
        if base is None:
            raise ValueError(f"expert {index} '{obj}' is a LoRA adapter: pass base= the model it adapts")
        return Expert(obj, base=base)
    return as_expert(obj, f"expert {index}")


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
    return jobs


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


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
) -> dict[str, Tensor] | Path | nn.Module:
    """Merge experts tensor by tensor with a strategy.

    Args:
        experts: the models to merge: :class:`Expert` objects, paths (``.ckpt``, ``.safetensors``, folders),
            state dicts or modules.
        base: the model the experts were fine-tuned from (task vectors are ``expert − base``); required by
            strategies with ``needs_base``.
        strategy: a :class:`~lightning_merge.strategies.Strategy`; default :class:`Linear` (uniform average).
        out: None returns a state dict; a folder path writes sharded safetensors (Hugging Face style, with the
            base folder's config and tokenizer files); a ``.safetensors`` path writes one file; a ``.ckpt`` path
            writes a Lightning checkpoint; an ``nn.Module`` is loaded in place.
        output: ``"peft"`` to write a PEFT LoRA adapter folder at ``out`` from LoRA experts (see ``rank``); None
            writes full weights as ``out`` says.
        include: glob patterns of tensor names to merge; others are copied from the base (or the first expert).
        exclude: glob patterns of tensor names copied from the base instead of merged.
        dtype: output dtype of floating tensors (default: each tensor's storage dtype in the base, or the first
            expert). Computation is always float32.
        on_missing: tensors some experts lack: ``"error"``; ``"union"`` (keep all; a missing expert tensor counts
            as the base's, or the first holder's value is copied when the base lacks it too);
            ``"intersection"`` (drop such tensors); ``"base"`` (the base's names; a missing expert tensor counts
            as the base's).
        on_missing_statistic: an expert without a statistic the strategy requires: ``"error"``, or ``"uniform"``
            (warn and use weight 1 for that expert).
        shard_size: largest safetensors shard (``"5GB"``, ``"500MB"`` or bytes).
        overwrite: replace an existing output once the new one is complete.
        threads: worker threads over tensors (default: up to 2). Whatever the count, the tensors being merged at
            once hold at most as many elements as the largest tensor, so threads do not raise peak memory.
        progress: show a progress bar (default: when stderr is a terminal).
        rank: with ``output="peft"``: None writes the exact concatenation of the adapters' factors (rank Σrᵢ; only
            for strategies linear in the task vectors: Linear, TaskArithmetic); an integer writes a truncated SVD of
            each merged ΔW at that rank and records the relative reconstruction error per module.

    Returns:
        The merged state dict (``out=None``), the written path, or the module.
    """
    strategy = strategy if strategy is not None else Linear()
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy object, got {type(strategy).__name__}")
    if on_missing_statistic not in ON_MISSING_STATISTIC:
        raise ValueError(
            f"on_missing_statistic must be one of {', '.join(ON_MISSING_STATISTIC)}, got {on_missing_statistic!r}"
        )
    if output not in (None, "peft"):
        raise ValueError(f"output must be None or 'peft', got {output!r}")
    if isinstance(experts, (str, os.PathLike, Expert, dict, nn.Module)):
        raise TypeError("experts must be a list (of paths, Expert objects, state dicts or modules)")
    experts = [_open_expert(e, base, i) for i, e in enumerate(experts)]
    if output == "peft":
        from lightning_merge.lora import merge_to_peft

        if out is None or isinstance(out, nn.Module):
            raise ValueError("output='peft' needs out= a folder to write the adapter into")
        return merge_to_peft(
            experts,
            base,
            strategy,
            Path(out),
            rank=rank,
            overwrite=overwrite,
            on_missing_statistic=on_missing_statistic,
        )
    if not experts:
        raise ValueError("merge() needs at least one expert")
    base_expert = as_expert(base, "base") if base is not None else None
    if strategy.needs_base and base_expert is None:
        raise ValueError(f"strategy {strategy.name!r} needs a base model (base=...); Linear does not")
    out_dtype = parse_dtype(dtype)
    started = time.perf_counter()

    plan = plan_merge(experts, base_expert, strategy, include=include, exclude=exclude, dtype=out_dtype,
                      on_missing=on_missing, on_missing_statistic=on_missing_statistic)
    jobs, reader = plan.jobs, plan._statistic_reader

    reference = base_expert or experts[0]
    provenance = {
        "library": "lightning-merge",
        "version": _version(),
        "strategy": strategy.to_dict(),
        "experts": [e.name for e in experts],
        "base": base_expert.name if base_expert else None,
    }
    writer = _make_writer(out, jobs, reference, provenance, shard_size, overwrite)
    try:
        _run(plan, strategy, writer, reader, threads or _default_threads(), progress)
        result = writer.finish()
    except BaseException:
        writer.abort()
        raise
    log.info(
        "merged %d tensors of %d experts with %s in %.2fs",
        len(jobs),
        len(experts),
        strategy.name,
        time.perf_counter() - started,
    )
    return result


def _version() -> str:
    from lightning_merge import __version__

    return __version__


def _make_writer(
    out: Any, jobs: list[TensorJob], reference: Expert, provenance: dict, shard_size: int | str, overwrite: bool
) -> Writer:
    if out is None:
        writer = DictWriter()
        writer.plan([j.name for j in jobs])
        return writer
    if isinstance(out, nn.Module):
        return ModuleWriter(out, [j.name for j in jobs])
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be None, a path or an nn.Module, got {type(out).__name__}")
    path = Path(out)
    if path.suffix == ".ckpt":
        template = reference.path if reference.path is not None and reference.path.suffix == ".ckpt" else None
        return CheckpointWriter(
            path, template=template, prefix=reference.prefix, provenance=provenance, overwrite=overwrite
        )
    entries = [(j.name, j.spec) for j in jobs]
    if path.suffix == ".safetensors":
        return SafetensorsWriter(path, entries, provenance=provenance, overwrite=overwrite, single_file=True)
    copy_from = reference.path if reference.path is not None and reference.path.is_dir() else None
    return SafetensorsWriter(
        path,
        entries,
        shard_size=parse_size(shard_size),
        copy_from=copy_from,
        provenance=provenance,
        overwrite=overwrite,
    )


class _StatisticReader:
    """Reads the statistics a strategy requires, with the ``on_missing_statistic`` policy."""

    def __init__(self, strategy: Strategy, experts: list[Expert], policy: str):
        self.kinds = tuple(strategy.requires)
        self.experts = experts
        self.policy = policy
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

    def __call__(self, name: str) -> list[dict[str, Tensor]]:
        if not self.kinds:
            return [{} for _ in self.experts]
        out: list[dict[str, Tensor]] = []
        missing: list[tuple[int, str]] = []
        for i, expert in enumerate(self.experts):
            entry = {}
            for kind in self.kinds:
                if i in self.uniform_experts:
                    entry[kind] = None
                    continue
                try:
                    entry[kind] = expert.statistic(name, kind)
                except StatisticsError:
                    entry[kind] = None
                    missing.append((i, kind))
            out.append(entry)
        if missing and len({i for i, _ in missing}) < len(self.experts) and self.policy == "error":
            i, kind = missing[0]
            raise StatisticsError(
                f"expert '{self.experts[i].name}' has no {kind!r} statistic for tensor '{name}' while other experts "
                f"do; pass on_missing_statistic='uniform' to weigh it uniformly"
            )
        shape = self.experts[0].spec(name).shape
        for entry in out:
            for kind, value in entry.items():
                if value is None:  # no expert has it (buffers, frozen tensors), or the uniform fallback
                    entry[kind] = torch.ones(shape, dtype=torch.float32)
                elif tuple(value.shape) != tuple(shape):
                    raise StatisticsError(
                        f"{kind!r} statistic of tensor '{name}' has shape {list(value.shape)}, the tensor "
                        f"{list(shape)}: the statistics do not belong to this expert"
                    )
        return out


def _run(
    plan: MergePlan, strategy: Strategy, writer: Writer, reader: _StatisticReader, threads: int, progress: bool | None
) -> None:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(plan.jobs), unit="tensor", desc="merging", disable=not show, leave=False)

    def work(job: TensorJob) -> None:
        writer.write(job.name, _compute(plan, strategy, reader, job))

    try:
        if threads <= 1:
            for job in plan.jobs:
                work(job)
                bar.update(1)
            return
        # Memory bound: the elements in flight never exceed the largest tensor's, so small tensors are merged
        # `threads` at a time while two of the largest (embeddings, heads) never are.
        budget = max(job.spec.numel for job in plan.jobs)
        pending: dict[Future, int] = {}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lightning-merge") as pool:
            for job in plan.jobs:
                size = job.spec.numel
                while pending and (len(pending) >= threads or sum(pending.values()) + size > budget):
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        del pending[f]
                        f.result()
                        bar.update(1)
                pending[pool.submit(work, job)] = size
            for f in pending:
                f.result()
                bar.update(1)
    finally:
        bar.close()


def _compute(plan: MergePlan, strategy: Strategy, reader: _StatisticReader, job: TensorJob) -> Tensor:
    name, out_dtype = job.name, job.spec.dtype
    if job.action == "copy":
        return job.source.tensor(name).to(out_dtype)
    if job.action in ("equal", "max"):
        holders = ([plan.base] if plan.base is not None and name in plan.base else []) + [
            e for e, present in zip(plan.experts, job.present) if present
        ]
        values = [h.tensor(name) for h in holders]
        if job.action == "max":
            return torch.stack(values).amax(dim=0)
        for holder, value in zip(holders[1:], values[1:]):
            if not torch.equal(value, values[0]):
                raise ValueError(
                    f"non-floating tensor '{name}' differs between '{holders[0].name}' and '{holder.name}'; such "
                    f"tensors (indices, position ids) are copied, not merged, so they must be equal. Exclude it "
                    f"or fix the expert"
                )
        return values[0]
    base = plan.base_tensor(name) if strategy.needs_base or not all(job.present) else None
    tensors = plan.expert_tensors(name, base)
    merged = strategy.merge_tensor(name, base, tensors, reader(name))
    if tuple(merged.shape) != job.spec.shape:
        raise RuntimeError(
            f"strategy {strategy.name!r} returned shape {list(merged.shape)} for tensor '{name}', "
            f"expected {list(job.spec.shape)}"
        )
    return merged.to(out_dtype)
