"""Where merged tensors go: a state dict, a live module, a sharded safetensors folder, a single safetensors file, a
Lightning checkpoint, or a PEFT LoRA adapter folder. Every file output is written under a temporary name, fsync'd,
and swapped in atomically when complete; what can be checked (the output path, a checkpoint template) is checked
when the writer is created, before any tensor is merged."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_merge.engine.card import write_folder_files
from lightning_merge.engine.lowrank import factor_delta, factor_product
from lightning_merge.engine.options import parse_size
from lightning_merge.files.atomic import commit, fsync_tree, partial_path
from lightning_merge.files.checkpoint import TRAINING_STATE, new_checkpoint, write_checkpoint
from lightning_merge.files.finite import cast_checked
from lightning_merge.files.outputs import check_not_an_input, check_output_path
from lightning_merge.files.ownership import PROVENANCE_NAME, write_record
from lightning_merge.files.safetensors import ShardWriter, TensorSpec
from lightning_merge.formats.lora import PEFT_PREFIX, LoraAdapter

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".distcp")
FILE_SUFFIXES = (".safetensors", ".ckpt")


@runtime_checkable
class Writer(Protocol):
    """What every output of a merge implements: it receives merged tensors (possibly from several threads) and makes
    them durable in :meth:`finish`. The writers below implement it; a class that subclasses it gets the defaults
    (no-op :meth:`abort` and :meth:`release`, ``finish`` returning None)."""

    #: the dtype the writer wants merged tensors in (None: the planned output dtype).
    compute_dtype: torch.dtype | None = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Take the merged tensor ``name`` (called once per tensor, possibly from several threads)."""
        raise NotImplementedError

    def finish(self) -> Any:
        """Make the result visible; return what ``merge`` returns."""
        return None

    def abort(self) -> None:
        """Discard a partial result (called on any error)."""

    def release(self) -> None:
        """Close this process's handles without discarding anything (another rank of a distributed merge owns the
        output and discards it)."""


@runtime_checkable
class SharedOutput(Writer, Protocol):
    """A file output the ranks of a distributed merge write together: rank 0 creates :attr:`tmp`, the others attach
    to it; each closes its part with :meth:`close_shards` before rank 0 commits."""

    #: the temporary output (file or folder) the ranks write into.
    tmp: Path

    def close_shards(self) -> None:
        """fsync and close this process's part of the output."""


class DictWriter(Writer):
    """Collects the merged tensors into a state dict (``out=None``), returned in plan order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._order = list(names)

    def write(self, name: str, tensor: Tensor) -> None:
        self.tensors[name] = tensor

    def finish(self) -> dict[str, Tensor]:
        return {n: self.tensors[n] for n in self._order if n in self.tensors}


class ModuleWriter(Writer):
    """Copies each merged tensor into the module's parameter or buffer of that name, as it is produced."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module = module
        self.targets = module.state_dict(keep_vars=True)
        missing = [n for n in names if n not in self.targets]
        extra = [n for n in self.targets if n not in set(names)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the merge produces tensors the module lacks: {', '.join(missing[:5])}")
            if extra:
                parts.append(f"the module has tensors the merge does not produce: {', '.join(extra[:5])}")
            raise ValueError(
                f"cannot load the merge into {type(module).__name__}: {'; '.join(parts)}. Open the experts with "
                f"prefix= so their names match the module's, or merge into a sub-module"
            )

    def write(self, name: str, tensor: Tensor) -> None:
        target = self.targets[name]
        with torch.no_grad():
            value = cast_checked(tensor, target.dtype, name, "the module's dtype: convert it, e.g. module.float()")
            target.copy_(value.to(device=target.device))

    def finish(self) -> nn.Module:
        return self.module


class SafetensorsWriter(SharedOutput):
    """A Hugging Face style folder (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index), or one
    ``.safetensors`` file when ``single_file``.

    Args:
        out: the folder (or file) to create.
        entries: every output tensor with its final shape and dtype, in writing order.
        shard_size: largest shard in bytes (a tensor larger than this gets a shard of its own).
        copy_from: a folder whose non-weight files (config.json, tokenizer files...) are copied in; ``config.json``'s
            ``torch_dtype`` is updated to the output's floating dtype.
        provenance: written as ``lightning_merge.json`` in the folder (and in each file's metadata).
        files: a folder's other files (:func:`~lightning_merge.engine.card.write_folder_files`), after the support
            files; a folder also gets a ``README.md`` model card from ``provenance`` unless ``files`` holds one.
        overwrite: replace an existing ``out`` once the new one is complete.
        inputs: the merge's input paths (an output that is one of them is refused).
    """

    def __init__(
        self,
        out: Path,
        entries: Sequence[tuple[str, TensorSpec]],
        *,
        shard_size: int = 5 << 30,
        copy_from: Path | None = None,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
        single_file: bool = False,
        inputs: Sequence[Path] = (),
        attach: Path | None = None,
        files: Sequence[tuple[str, Any]] | None = None,
    ):
        self.out = out
        self.files = tuple(files or ())
        self.single_file = single_file
        self.copy_from = copy_from
        self.provenance = provenance or {}
        check_output_path(out, overwrite, inputs=inputs, folder=not single_file)
        self.replace = "own" if overwrite else "never"  # what the commit may find at ``out`` (see io.commit)
        self.tmp = attach if attach is not None else partial_path(out)
        groups: list[list[tuple[str, TensorSpec]]] = [[]]
        size = 0
        for name, spec in entries:
            if groups[-1] and size + spec.nbytes > shard_size and not single_file:
                groups.append([])
                size = 0
            groups[-1].append((name, spec))
            size += spec.nbytes
        floating = {spec.dtype for _, spec in entries if spec.dtype.is_floating_point}
        self.dtype = floating.pop() if len(floating) == 1 else None
        metadata = {"format": "pt", "lightning_merge": json.dumps(self.provenance, default=str)}
        self.shards: list[ShardWriter] = []
        self.shard_of: dict[str, ShardWriter] = {}
        if single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            paths = [self.tmp]
        else:
            if attach is None:
                self.tmp.mkdir(parents=True)
            n = len(groups)
            names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            paths = [self.tmp / name for name in names]
        self.total_size = sum(spec.nbytes for _, spec in entries)
        try:
            for path, group in zip(paths, groups):
                shard = ShardWriter(path, group, metadata, create=attach is None)
                self.shards.append(shard)
                for name, _ in group:
                    self.shard_of[name] = shard
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor) -> None:
        self.shard_of[name].write(name, tensor)

    def write_rows(self, name: str, start: int, rows: Tensor) -> None:
        """Write rows ``start ..`` of tensor ``name`` (a row chunk of a merge: the tensor is never whole in memory)."""
        self.shard_of[name].write_rows(name, start, rows)

    def close_shards(self) -> None:
        """fsync and close this process's shard files (a distributed merge's ranks, before rank 0 finishes)."""
        for shard in self.shards:
            shard.close(sync=True)

    def finish(self) -> Path:
        self.close_shards()
        if self.single_file:
            commit(self.tmp, self.out, replace=self.replace)
            return self.out
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: shard.path.name for name, shard in self.shard_of.items()},
            }
            write_json(self.tmp / "model.safetensors.index.json", index)
        if self.copy_from is not None:
            copy_support_files(self.copy_from, self.tmp, dtype=self.dtype)
        write_folder_files(self.tmp, self.files, self.provenance, self.out.name)
        write_record(self.tmp, self.provenance)  # last: it lists every file of the folder
        fsync_tree(self.tmp)
        commit(self.tmp, self.out, replace=self.replace)
        return self.out

    def release(self) -> None:
        for shard in self.shards:
            shard.close(sync=False)

    def abort(self) -> None:
        self.release()
        if self.single_file:
            self.tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class CheckpointWriter(Writer):
    """A Lightning checkpoint whose ``state_dict`` holds the merged tensors.

    With a template checkpoint (the base's, or the first expert's), its other entries are kept (hyper-parameters,
    epoch, global step, tensors outside the merged prefix) so ``LightningModule.load_from_checkpoint`` works;
    optimizer and scheduler states are dropped (they belong to the template's weights, not the merge): the result
    loads like a ``save_weights_only`` checkpoint. The template is loaded (and refused if it cannot be) when the
    writer is created, before the merge.
    """

    def __init__(self, out: Path, *, template: Path | None, prefix: str, provenance: dict[str, Any],
                 overwrite: bool, trust_checkpoint: bool = False, inputs: Sequence[Path] = ()):
        from lightning_merge.files.torch_load import load_torch_file

        check_output_path(out, overwrite, inputs=inputs, folder=False)
        self.out = out
        self.replace = "own" if overwrite else "never"
        self.prefix = prefix
        self.provenance = provenance
        self.tensors: dict[str, Tensor] = {}
        if template is not None:
            loaded = load_torch_file(template, trust_checkpoint)
            if not isinstance(loaded, dict):
                raise ValueError(f"checkpoint template '{template}' holds a {type(loaded).__name__}, not a checkpoint")
            self.checkpoint = dict(loaded)
            self.state = dict(self.checkpoint.get("state_dict", {}))
        else:
            self.checkpoint = new_checkpoint()
            self.state = {}

    def write(self, name: str, tensor: Tensor) -> None:
        self.tensors[self.prefix + name] = tensor

    def finish(self) -> Path:
        state = dict(self.state)
        state.update(self.tensors)
        record = json.loads(json.dumps(self.provenance, default=str))
        write_checkpoint(self.out, state, record, template=self.checkpoint, drop=TRAINING_STATE, replace=self.replace)
        return self.out


class PeftWriter(SharedOutput):
    """A PEFT LoRA adapter folder, written module by module as the merge produces them.

    - **Exact** (``rank=None``; strategies linear in the experts): each module's merged ΔW = Σ cᵢ sᵢ Bᵢ Aᵢ is written
      as concatenated factors A = [A₁; …], B = [c₁s₁B₁, …] (rank Σrᵢ, scaling 1), from the coefficients the
      prepared strategy declares (:meth:`~lightning_merge.strategies.Prepared.linear_form`); no ΔW is formed.
    - **Truncated SVD** (``rank=k``; any strategy): each merged weight arrives through :meth:`write` and is factored
      at once (ΔW = merged − θ₀ in float32; B = U√Σ, A = √Σ Vᵀ), so only one module is held at a time; the relative
      reconstruction error per module goes into ``lightning_merge.json``. For a strategy linear in the experts the
      merged ΔW is the product of the concatenated factors, so its truncated SVD comes from their QR factors and the
      SVD of a small (Σrᵢ)² core: the same factors (to float32 rounding) without forming ΔW or merging the module.
    - Whole tensors some adapters save (``modules_to_save``) are written merged; ``lora_bias`` biases as
      ``lora_B.bias`` (the merged bias minus the base's).

    Args:
        out: the adapter folder to create.
        adapters: the experts' adapters, in order.
        base: the base :class:`~lightning_merge.Expert`.
        rank: None for the exact concatenation, else the SVD rank.
        prepared: the prepared strategy (its linear forms drive the exact mode).
        provenance: what ``lightning_merge.json`` records.
        overwrite: replace an existing folder once the new one is complete.
        inputs: the merge's input paths.
    """

    compute_dtype = torch.float32

    def __init__(self, out: Path, adapters: Sequence[LoraAdapter], base: Any, *, rank: int | None, prepared: Any,
                 provenance: dict[str, Any], overwrite: bool, inputs: Sequence[Path] = (), attach: Path | None = None):
        check_output_path(out, overwrite, inputs=inputs, folder=True)
        self.replace = "own" if overwrite else "never"
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer (or None for the exact adapter), got {rank!r}")
        self.out, self.adapters, self.base, self.rank, self.prepared = out, list(adapters), base, rank, prepared
        self.provenance = dict(provenance)
        fan = {info["fan_in_fan_out"] for a in adapters for info in a.modules.values()}
        if len(fan) > 1:
            raise ValueError("the adapters disagree on fan_in_fan_out; they cannot share one adapter")
        self.fan_in_fan_out = fan.pop() if fan else False
        self.targets = sorted({t for a in adapters for t in a.modules})
        self.full = sorted({t for a in adapters for t in a.full})
        clash = sorted(set(self.targets) & set(self.full))
        if clash:
            raise ValueError(
                f"'{clash[0]}' is adapted by LoRA in one adapter and saved whole (modules_to_save) in another: one "
                "adapter cannot hold both; merge full weights instead (no output='peft')"
            )
        self.biases = sorted({b for a in adapters for b in a.bias_of})
        self.info = {t: next(a.modules[t] for a in adapters if t in a.modules) for t in self.targets}
        self.full_key = {t: next(a.full[t] for a in adapters if t in a.full) for t in self.full}
        self.errors: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        entries: list[tuple[str, TensorSpec]] = []
        for t in self.targets:
            a_shape, b_shape = self._factor_shapes(t)
            key = self.info[t]["module_key"]
            entries.append((f"{key}.lora_A.weight", TensorSpec(a_shape, torch.float32)))
            entries.append((f"{key}.lora_B.weight", TensorSpec(b_shape, torch.float32)))
            self.ranks[t] = a_shape[0]
        for b in self.biases:
            key = self.info[self._bias_target(b)]["module_key"]
            entries.append((f"{key}.lora_B.bias", TensorSpec(base.spec(b).shape, torch.float32)))
        for t in self.full:
            entries.append((self.full_key[t], TensorSpec(base.spec(t).shape, torch.float32)))
        # a strategy linear in the experts everywhere: factors straight from the adapters' own (no merge of ΔW)
        self.from_factors = self.exact or all(self._linear_form(t) is not None for t in self.targets)
        self.owned: set[str] | None = None  # a distributed merge: the modules this rank factors
        self.tmp = attach if attach is not None else partial_path(out)
        if attach is None:
            self.tmp.mkdir(parents=True)
        self.file = ShardWriter(self.tmp / "adapter_model.safetensors", entries, {"format": "pt"},
                                create=attach is None)

    def _linear_form(self, target: str) -> Any:
        form = self.prepared.linear_form(target) if self.prepared is not None else None
        return form if form is not None and form.preserves_base else None

    def _bias_target(self, bias: str) -> str:
        return next(a.bias_of[bias] for a in self.adapters if bias in a.bias_of)

    def _factor_shapes(self, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        weight = tuple(self.base.spec(target).shape)
        stored = (weight[1], weight[0]) if self.fan_in_fan_out and len(weight) == 2 else weight  # (out, in, k...)
        if self.rank is None:
            rank = sum(a.modules[target]["rank"] for a in self.adapters if target in a.modules)
        else:
            rank = min(self.rank, stored[0], int(torch.Size(stored[1:]).numel()))
        b_shape = (stored[0], rank) + (1,) * (len(stored) - 2)
        return (rank, *stored[1:]), b_shape

    @property
    def exact(self) -> bool:
        return self.rank is None

    def names_to_merge(self) -> list[str]:
        """The tensors the engine must merge for this adapter (the others never reach :meth:`write`)."""
        return ([] if self.from_factors else list(self.targets)) + list(self.biases) + list(self.full)

    def _concatenated(self, t: str) -> tuple[Tensor, Tensor]:
        """Module ``t``'s merged ΔW as factors: A = [A₁; …], B = [c₁s₁B₁, …] (ΔW = B A), from the linear form."""
        form = self._linear_form(t)
        if form is None:
            raise ValueError(f"the strategy is not linear with coefficients summing to 1 at '{t}'; pass rank= "
                             "(--rank K on the command line)")
        a_parts, b_parts = [], []
        for c, adapter in zip(form.experts, self.adapters):
            if t not in adapter.modules:
                continue
            a, b = adapter.factors(t)
            a_parts.append(a.to(torch.float32))
            b_parts.append(b.to(torch.float32) * (c * adapter.modules[t]["scaling"]))
        return torch.cat(a_parts, 0), torch.cat(b_parts, 1)

    def write_factors(self) -> None:
        """Every module from the adapters' factors: concatenated (exact mode) or their truncated SVD (rank k); in a
        distributed merge, this rank's modules."""
        for t in self.targets:
            if self.owned is not None and t not in self.owned:
                continue
            a, b = self._concatenated(t)
            key = self.info[t]["module_key"]
            if not self.exact:
                a, b, self.errors[t[: -len(".weight")]] = factor_product(b, a, self.ranks[t])
            self.file.write(f"{key}.lora_A.weight", a.contiguous())
            self.file.write(f"{key}.lora_B.weight", b.contiguous())

    def write(self, name: str, tensor: Tensor) -> None:
        merged = tensor.to(torch.float32)
        if name in self.full_key:
            self.file.write(self.full_key[name], merged.contiguous())
            return
        delta = merged - self.base.tensor(name).to(torch.float32)
        if name in self.biases:
            key = self.info[self._bias_target(name)]["module_key"]
            self.file.write(f"{key}.lora_B.bias", delta.contiguous())
            return
        try:
            a, b, error = factor_delta(delta, self.ranks[name], self.fan_in_fan_out)
        except ValueError as err:
            raise ValueError(f"adapter output, tensor '{name}': {err}") from None
        key = self.info[name]["module_key"]
        self.file.write(f"{key}.lora_A.weight", a)
        self.file.write(f"{key}.lora_B.weight", b)
        self.errors[name[: -len(".weight")]] = error

    def close_shards(self) -> None:
        """Write what comes from the adapters' factors, then fsync and close the adapter file."""
        if self.from_factors and self.file.fd >= 0:
            self.write_factors()
        self.file.close(sync=True)

    def finish(self) -> Path:
        self.close_shards()
        return self.commit()

    def commit(self) -> Path:
        """The config and provenance, then the folder into place (after every module is written)."""
        config = dict(self.adapters[0].config)
        top = max(self.ranks.values()) if self.ranks else 1
        modules = {t: _module_name(self.info[t]["module_key"]) for t in self.targets}
        to_save = sorted({_module_name(k[: k.rindex(".")]) for k in self.full_key.values()})
        config.update({
            "r": top,
            "lora_alpha": top,
            "rank_pattern": {re.escape(modules[t]): self.ranks[t] for t in self.targets if self.ranks[t] != top},
            "alpha_pattern": {re.escape(modules[t]): self.ranks[t] for t in self.targets if self.ranks[t] != top},
            "target_modules": sorted(modules.values()),
            "modules_to_save": to_save or None,
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": bool(self.biases),
            "fan_in_fan_out": self.fan_in_fan_out,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
        })
        write_json(self.tmp / "adapter_config.json", config)
        self.provenance.update({
            "mode": "concatenated factors (exact)" if self.exact else f"truncated SVD at rank {self.rank}",
            "ranks": {t[: -len(".weight")]: r for t, r in self.ranks.items()},
            "relative_error": {k: self.errors[k] for k in sorted(self.errors)},
        })
        write_record(self.tmp, self.provenance)  # last: it lists every file of the folder
        fsync_tree(self.tmp)
        commit(self.tmp, self.out, replace=self.replace)
        return self.out

    def release(self) -> None:
        self.file.close(sync=False)

    def abort(self) -> None:
        self.release()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _module_name(module_key: str) -> str:
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def copy_support_files(src: Path, dst: Path, dtype: torch.dtype | None = None) -> None:
    """Copy a model folder's non-weight files (config, generation config, tokenizer) into ``dst``; with ``dtype``,
    ``config.json``'s ``torch_dtype`` (and ``dtype``) say the written dtype, as mergekit does."""
    from lightning_merge.formats.sidecar import SIDECAR_NAME, SIDECAR_SUFFIX

    for item in src.iterdir():
        if not item.is_file() or item.name in (SIDECAR_NAME, PROVENANCE_NAME) or item.name.endswith(SIDECAR_SUFFIX):
            continue
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.startswith("."):
            continue
        if item.name == "config.json" and dtype in DTYPE_NAMES:
            try:
                config = json.loads(item.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                config = None
            if isinstance(config, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in config or key == "torch_dtype":
                        config[key] = DTYPE_NAMES[dtype]
                write_json(dst / item.name, config)
                continue
        shutil.copy2(item, dst / item.name)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


__all__ = [
    "CheckpointWriter", "DictWriter", "ModuleWriter", "PeftWriter", "SafetensorsWriter", "SharedOutput", "Writer",
    "check_not_an_input", "check_output_path", "copy_support_files", "factor_delta", "factor_product", "parse_size",
    "write_json",
]
