"""Where a merge goes, checked before the first tensor is merged: the writer ``out`` asks for (:func:`make_writer`), a
PEFT adapter output (:func:`check_peft_request`, :func:`peft_writer`), the output path's rules, and the dry run's
description of it all (:func:`describe_plan`, a :class:`DryRun`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_merge.engine.options import MergeOptions, check_strategy
from lightning_merge.engine.plan import Plan, StatisticReader, TensorJob, build_jobs
from lightning_merge.engine.writers import (
    FILE_SUFFIXES,
    CheckpointWriter,
    DictWriter,
    ModuleWriter,
    PeftWriter,
    SafetensorsWriter,
    Writer,
)
from lightning_merge.files.outputs import check_output
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.files.remote import is_url, redact
from lightning_merge.sources.distcp import checkpoint_template
from lightning_merge.sources.expert import Expert
from lightning_merge.strategies.base import Strategy


def check_out_suffix(out: Any, options: MergeOptions) -> None:
    """Refuse a file suffix that is not an output format (``.pt``, ``.bin``...) rather than write a folder by it.

    Raises:
        ValueError: naming ``out`` and the formats.
    """
    if isinstance(out, (str, os.PathLike)) and options.output is None:
        suffix = Path(out).suffix
        if suffix and suffix not in FILE_SUFFIXES and suffix in (".pt", ".pth", ".bin", ".pkl", ".json"):
            raise ValueError(
                f"out='{out}': {suffix} is not an output format; use a folder (sharded safetensors), a .safetensors "
                "file or a .ckpt Lightning checkpoint"
            )


def unique_names(experts: Sequence[Expert]) -> list[str]:
    """The experts' names, made unique where several share one (``name#i``, i the expert's index)."""
    names = [e.name for e in experts]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def input_paths(experts: list[Expert], base: Expert | None) -> list[Path | str]:
    """Every file, folder and URL the merge reads (weights, sidecars, adapters' bases): the output must be none."""
    return [s for e in [*experts, *([base] if base is not None else [])] for s in e.sources()]


def check_peft_request(strategy: Strategy, out: Any, rank: int | None, num_experts: int | None) -> None:
    """What can be refused about an adapter output from the strategy's configuration alone.

    Args:
        strategy: the merge's strategy.
        out: the merge's ``out``.
        rank: the adapter's rank (None: exact).
        num_experts: how many experts, when known before they are opened.

    Raises:
        ValueError: naming what makes the adapter impossible and what to pass.
    """
    if out is None or isinstance(out, nn.Module):
        raise ValueError("output='peft' needs out= a folder to write the adapter into")
    if rank is None and not strategy.linear:
        raise ValueError(
            f"strategy {strategy.name!r} is not linear in the experts (its merge is not Σ cᵢ·ΔWᵢ), so no exact "
            "adapter exists: pass rank= (--rank K on the command line) for a truncated-SVD adapter"
        )
    if num_experts:
        form = strategy.linear_form(num_experts)
        if form is not None and not form.preserves_base:
            raise ValueError(
                f"{strategy!r} scales the base itself (coefficients sum to {form.base + sum(form.experts):g}, not 1): "
                "an adapter holds only a change to the base; use normalize=True, weights that sum to 1, or "
                "TaskArithmetic"
            )


def peft_writer(plan: Plan, strategy: Strategy, out: Any, provenance: dict, options: MergeOptions, inputs: list,
                attach: Path | None = None) -> PeftWriter:
    """The adapter writer for ``plan``, once the experts are open (LoRA adapters over the base).

    Args:
        plan: the merge's plan (prepared).
        strategy: the merge's strategy.
        out: the adapter folder.
        provenance: what ``lightning_merge.json`` records.
        options: the merge's options (``rank``, ``overwrite``).
        inputs: the merge's input paths.
        attach: the temporary output rank 0 of a distributed merge created.
    """
    plain = [e.name for e in plan.experts if e.lora is None]
    if plain:
        raise ValueError(f"output='peft' needs LoRA adapter experts; '{plain[0]}' is not one")
    if plan.base is None:
        raise ValueError("output='peft' needs base= the model the adapters adapt")
    for name in plan.names:
        form = plan.prepared.linear_form(name)
        if form is not None and not form.preserves_base:
            raise ValueError(f"{strategy!r} scales the base at '{name}': an adapter holds only a change to the base")
    return PeftWriter(Path(out), [e.lora for e in plan.experts], plan.base, rank=options.rank, prepared=plan.prepared,
                      provenance=provenance, overwrite=options.overwrite, inputs=inputs, attach=attach)


def make_writer(out: Any, jobs: list[TensorJob], reference: Expert, provenance: dict, options: MergeOptions,
                inputs: Sequence[Path | str] = (), attach: Path | None = None) -> Writer:
    """The writer ``out`` asks for (checked now: path, template checkpoint).

    Args:
        out: None (a state dict), an ``nn.Module``, or a path (folder, ``.safetensors``, ``.ckpt``).
        jobs: the tensor jobs, in writing order.
        reference: the base, or the first expert (a ``.ckpt`` template, the folder whose support files are copied).
        provenance: what the output records about the merge.
        options: the merge's options (``shard_size``, ``overwrite``).
        inputs: the merge's input paths (an output that is one of them is refused).
        attach: the temporary output another rank of a distributed merge created (safetensors outputs only).
    """
    overwrite, shard_size = options.overwrite, options.shard_size
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
                             overwrite=overwrite, inputs=inputs, attach=attach, files=options.files)


@dataclass(frozen=True)
class TensorCounts:
    """How many tensors a merge merges, copies, and checks (non-floating).

    Attributes:
        merge: tensors merged by the strategy.
        copy: floating tensors copied (excluded, or held by one expert only).
        non_floating: integer or complex tensors checked equal (or maxed: ``num_batches_tracked``).
    """

    merge: int
    copy: int
    non_floating: int


@dataclass(frozen=True)
class DryRun:
    """What :func:`~lightning_merge.merge` would do (``dry_run=True``), from headers alone.

    Attributes:
        experts: the experts' names (unique).
        base: the base's name, or None.
        strategy: the strategy's ``to_dict()``.
        global_pass: whether the strategy makes a first pass over the model.
        tensors: the counts of tensors merged, copied and checked.
        parameters: the number of elements of every output tensor.
        statistics: per expert, ``{kind: the statistic found, or None}`` for each kind the strategy requires.
        output: the output path (redacted URL), or None for a state dict or a module.
        output_kind: ``"files"``, ``"state dict"``, ``"module"`` or ``"peft adapter"``.
        output_bytes: the output's size (None for an adapter).
        output_exists: something is at the output path already.
    """

    experts: tuple[str, ...]
    base: str | None
    strategy: dict[str, Any]
    global_pass: bool
    tensors: TensorCounts
    parameters: int
    statistics: tuple[dict[str, str | None], ...]
    output: str | None
    output_kind: str
    output_bytes: int | None
    output_exists: bool

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (lists and dicts), e.g. for ``json.dumps``."""
        data = dataclasses.asdict(self)
        data["experts"], data["statistics"] = list(self.experts), list(self.statistics)
        return data


def describe_plan(experts: list[Expert], base: Expert | None, strategy: Strategy, out: Any,
                  options: MergeOptions) -> DryRun:
    """What :func:`~lightning_merge.merge` would do, from headers alone (``dry_run=True``): nothing is read or
    written.

    Args:
        experts: the opened experts.
        base: the opened base, or None.
        strategy: the strategy.
        out: the merge's ``out``.
        options: the merge's options.
    """
    check_strategy(strategy, experts, base)
    jobs = build_jobs(experts, base, options)
    StatisticReader(strategy, experts, options.on_missing_statistic, {j.name: j for j in jobs}).check()
    output = options.output
    if isinstance(out, (str, os.PathLike)):
        check_output(out, options.overwrite, inputs=input_paths(experts, base),
                     folder=Path(out).suffix not in FILE_SUFFIXES or output == "peft")
    actions: dict[str, int] = {}
    for job in jobs:
        actions[job.action] = actions.get(job.action, 0) + 1
    statistics = tuple({kind: (e.statistics.resolve_kind(kind) if e.has_statistic(kind) else None)
                        for kind in strategy.requires} for e in experts)
    return DryRun(
        experts=tuple(unique_names(experts)),
        base=base.name if base is not None else None,
        strategy=strategy.to_dict(),
        global_pass=strategy.global_pass,
        tensors=TensorCounts(merge=actions.get("merge", 0), copy=actions.get("copy", 0),
                             non_floating=actions.get("equal", 0) + actions.get("max", 0)),
        parameters=sum(j.spec.numel for j in jobs),
        statistics=statistics,
        output=None if out is None or isinstance(out, nn.Module) else redact(out),
        output_kind="peft adapter" if output == "peft" else ("module" if isinstance(out, nn.Module) else
                                                             "state dict" if out is None else "files"),
        output_bytes=sum(j.spec.nbytes for j in jobs) if output != "peft" else None,
        output_exists=isinstance(out, (str, os.PathLike)) and (remote_exists(out) if is_url(out) else
                                                                os.path.lexists(out)),
    )


__all__ = [
    "DryRun",
    "TensorCounts",
    "check_out_suffix",
    "check_peft_request",
    "describe_plan",
    "input_paths",
    "make_writer",
    "peft_writer",
    "unique_names",
]
