"""What a merge will do, decided before the first tensor is merged: the tensor jobs (names, shapes and dtypes from
headers only, the include/exclude selection of :func:`~lightning_merge.engine.options.selects`), the check of the
statistics a strategy requires, and the :class:`Plan` a strategy's first pass reads through.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_merge.engine.options import MergeOptions, check_strategy, selects
from lightning_merge.formats.sidecar import GRAM, MissingStatistic, StatisticsError
from lightning_merge.sources.expert import Expert, TensorSpec
from lightning_merge.strategies.base import Prepared, Strategy

log = logging.getLogger("lightning_merge")


@dataclass
class TensorJob:
    """What the engine does with one output tensor.

    Attributes:
        name: the tensor's name.
        action: ``"merge"``, ``"copy"``, ``"equal"`` (non-floating: the experts must agree) or ``"max"``
            (``num_batches_tracked``).
        spec: the output's shape and dtype.
        present: which experts hold the tensor.
        source: the expert a ``"copy"`` comes from.
    """

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
        """How many experts are merged."""
        return len(self.experts)

    def spec(self, name: str) -> TensorSpec:
        """Tensor ``name``'s output shape and dtype."""
        return self._by_name[name].spec

    def base_tensor(self, name: str, rows: tuple[int, int] | None = None) -> Tensor | None:
        """The base's tensor in float32 (None without a base or where the base lacks it); ``rows=(start, stop)``:
        those rows only (see :meth:`Expert.tensor`)."""
        if self.base is None or name not in self.base:
            return None
        return self.base.float32(name, rows)

    def expert_tensors(self, name: str, base: Tensor | None = None,
                       rows: tuple[int, int] | None = None) -> list[Tensor]:
        """Every expert's tensor (or its ``rows``) in float32; an expert lacking it (``on_missing`` union/base) gets
        the base's (``base``, read here when not given)."""
        job = self._by_name[name]
        if base is None and not all(job.present):
            base = self.base_tensor(name, rows)
        return [e.float32(name, rows) if present else base for e, present in zip(self.experts, job.present)]

    def task_vectors(self, name: str) -> Tensor:
        """Stacked task vectors ``(N, *shape)`` in float32 (needs a base)."""
        base = self.base_tensor(name)
        if base is None:
            raise ValueError(f"task vectors of '{name}' need a base model")
        return torch.stack([t - base for t in self.expert_tensors(name, base)])

    def stats(self, name: str, rows: tuple[int, int] | None = None) -> list[dict[str, Tensor]]:
        """Every expert's merge-ready statistics for tensor ``name`` (or their ``rows``), as ``merge_tensor``
        receives them."""
        return self._statistic_reader(name, rows)

    def statistics(self, name: str, kind: str, rows: tuple[int, int] | None = None) -> list[Tensor]:
        """Every expert's merge-ready statistic of ``kind`` for tensor ``name`` (or its ``rows``)."""
        return [s[kind] for s in self._statistic_reader(name, rows)]



def plan_merge(
    experts: list[Expert],
    base: Expert | None,
    strategy: Strategy,
    options: MergeOptions | None = None,
    *,
    distribution: Any = None,
    **settings: Any,
) -> Plan:
    """Everything before the first tensor is merged: the tensor jobs, the check that every expert has the
    statistics the strategy requires, and the strategy's first pass (its :class:`Prepared`, in ``plan.prepared``).

    Args:
        experts: the opened experts.
        base: the opened base, or None.
        strategy: the strategy.
        options: the merge's :class:`MergeOptions`; or give its fields as keywords (``include=...``,
            ``on_missing=...``), checked here.
        distribution: a :class:`~lightning_merge.engine.distributed.Distribution` to split the first pass (and the
            merge) over.
        **settings: :class:`MergeOptions` fields, when ``options`` is None.
    """
    if options is None:
        options = MergeOptions(**settings)
    elif settings:
        raise TypeError(f"plan_merge: pass options= or its fields ({', '.join(settings)}), not both")
    check_strategy(strategy, experts, base)
    jobs = build_jobs(experts, base, options)
    reader = StatisticReader(strategy, experts, options.on_missing_statistic, {j.name: j for j in jobs})
    reader.check()
    plan = Plan(experts, base, jobs, reader)
    plan.progress = options.progress
    if distribution is not None:
        distribution.assign([(j.name, j.spec.nbytes) for j in jobs])
        plan.distribution = distribution
    plan.prepared = strategy.prepare(plan)
    if not isinstance(plan.prepared, Prepared):
        raise TypeError(f"{type(strategy).__name__}.prepare must return a Prepared object, got {plan.prepared!r}")
    return plan


def _ordered_union(lists: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for names in lists:
        for n in names:
            seen.setdefault(n, None)
    return list(seen)


def build_jobs(experts: list[Expert], base: Expert | None, options: MergeOptions) -> list[TensorJob]:
    """Check names, shapes and dtypes of every tensor (headers only) and decide what to do with each.

    Args:
        experts: the opened experts.
        base: the opened base, or None.
        options: the merge's options (``include``, ``exclude``, ``on_missing``, the output dtype).

    Raises:
        ValueError: a tensor some experts lack (with ``on_missing="error"``), a shape mismatch, or a dtype
            mismatch without an explicit output ``dtype``; the message names the tensor and the experts.
    """
    on_missing, dtype = options.on_missing, options.plan_dtype
    include, exclude = options.include, options.exclude
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
        if not selects(name, include, exclude):
            from_first = options.unmerged_from == "first" and any(present)
            source = next(e for e in experts if name in e) if from_first else holders[0]
            jobs.append(TensorJob(name, "copy", out_spec, present, source=source))
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


def _check_patterns(names: Sequence[str], jobs: Sequence[TensorJob], include: tuple[str, ...] | None,
                    exclude: tuple[str, ...] | None) -> None:
    """A pattern that matches no tensor is a typo or a wrong prefix (what it was meant to select would be merged, or
    left out, without a word); patterns that leave nothing to merge would write a copy of the base: both refused."""
    sample = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
    for option, found in (("include", include), ("exclude", exclude)):
        for pattern in found or ():
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{option} pattern {pattern!r} matches no tensor (tensors are named like {sample}); patterns are "
                    "shell globs over whole names (use 'layers.0.*', not 'layers.0'), after any prefix= is removed"
                )
    if (include is not None or exclude) and not any(job.action == "merge" for job in jobs):
        shown = [None if p is None else list(p) for p in (include, exclude)]
        raise ValueError(
            f"include={shown[0]!r} and exclude={shown[1]!r} leave no floating-point tensor to merge, so the output "
            f"would be a copy of the base (tensors are named like {sample}); widen include or narrow exclude"
        )


class StatisticReader:
    """Reads the statistics a strategy requires, with the ``on_missing_statistic`` policy. Only a statistic that is
    absent falls under the policy; one that is there but wrong (shape, NaN, negative) is always an error.

    Args:
        strategy: its ``requires`` are the kinds read.
        experts: the opened experts.
        policy: ``on_missing_statistic``.
        jobs: the tensor jobs by name.
    """

    def __init__(self, strategy: Strategy, experts: list[Expert], policy: str, jobs: dict[str, TensorJob]):
        self.kinds = tuple(strategy.requires)
        self.strategy_name = strategy.name or type(strategy).__name__
        self.experts = experts
        self.policy = policy
        self.jobs = jobs
        self.uniform_experts: set[int] = set()

    def check(self) -> None:
        """Every expert has each required statistic, or the policy says what stands in (checked from headers)."""
        for kind in self.kinds:
            for i, expert in enumerate(self.experts):
                if expert.has_statistic(kind):
                    continue
                if self.policy == "error":
                    how = 'CurvatureCapture(gram="after_fit" or "train")' if kind == GRAM else "CurvatureCapture"
                    raise StatisticsError(
                        f"expert '{expert.name}' has no {kind!r} statistics, which {self.strategy_name} needs; capture "
                        f"them with {how}, pass statistics=..., or pass on_missing_statistic='uniform' "
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

    def __call__(self, name: str, rows: tuple[int, int] | None = None) -> list[dict[str, Tensor]]:
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
                    entry[kind] = expert.statistic(name, kind, rows=rows)
                except MissingStatistic:
                    entry[kind] = None
                    missing.append((i, kind))
            out.append(entry)
        if any(kind == GRAM and job.present[i] for i, kind in missing):
            # An adapter that leaves a tensor unchanged reads as a zero Gram matrix (it does not pull the layer,
            # docs/lora.md), the embedding included. Where an expert has none and every Gram given is such a zero
            # (an embedding another adapter saves whole, one a full fine-tune has no Gram of), nothing is known of the
            # tensor's inputs: it has no Gram matrix for any expert, as when none has one.
            given = [entry[GRAM] for entry in out if entry.get(GRAM) is not None]
            if all(not bool(g.any()) for g in given):
                for entry in out:
                    entry[GRAM] = None
                missing = [(i, kind) for i, kind in missing if kind != GRAM]
        if missing and len({i for i, _ in missing}) < len(self.experts) and self.policy == "error":
            i, kind = missing[0]
            why = "lacks the tensor itself" if not job.present[i] else "has none for it"
            raise StatisticsError(
                f"expert '{self.experts[i].name}' {why} ({kind!r} statistic of tensor '{name}') while other experts "
                f"have one; pass on_missing_statistic='uniform' to weigh it uniformly there"
            )
        shape = job.spec.shape if rows is None else (rows[1] - rows[0], *job.spec.shape[1:])
        for entry in out:
            for kind, value in entry.items():
                # No expert has it (buffers, frozen tensors), or the uniform fallback: ones of the tensor's shape.
                # A Gram matrix is not of the tensor's shape and has no uniform value: it stays None, and the
                # strategy (RegMean) says what None means.
                if value is None and kind != GRAM:
                    entry[kind] = torch.ones(shape, dtype=torch.float32)
        return out  # type: ignore[return-value]



__all__ = ["Plan", "StatisticReader", "TensorJob", "build_jobs", "plan_merge"]
