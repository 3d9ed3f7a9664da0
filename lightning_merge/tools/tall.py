"""TALL masks as compression: N experts stored as one merged task vector plus N bit-masks.

``compress`` merges the experts' task vectors (task arithmetic by default: ``τ_MTL = Σ λᵢ τᵢ``), computes each
expert's TALL mask ``mᵢ = 1[|τᵢ| > λᵢ |τ_MTL − τᵢ|]`` and writes a folder::

    tall.json              format version, expert names, λ, the merge strategy, tensor names and shapes
    task_vector.safetensors  τ_MTL, one tensor per floating-point parameter
    masks.safetensors        one packed bit-mask (uint8, 8 entries a byte, row-major) per expert and tensor,
                             keyed "{expert index}/{tensor name}"

``TallCompressed(folder).expert(i, base)`` recovers expert i as ``θ₀ + mᵢ ⊙ τ_MTL``, tensor by tensor on
demand. Storage is about ``(32 + N)/32N`` of N float32 experts (plus the base you keep anyway).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.engine.run import open_inputs, plan_merge, unique_names
from lightning_merge.engine.writers import write_json
from lightning_merge.files.atomic import commit, fsync_tree, partial_path, writing
from lightning_merge.files.finite import cast_checked, largest_magnitude
from lightning_merge.files.outputs import check_output_path
from lightning_merge.files.ownership import write_record
from lightning_merge.files.safetensors import SafetensorsFile, ShardWriter, TensorSpec
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import Strategy
from lightning_merge.strategies.linear import TaskArithmetic

FORMAT = "lightning-merge/tall"
VERSION = 1


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as uint8 bytes, 8 entries a byte (entry j of a byte is bit j), row-major, zero-padded."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = (1 << torch.arange(8, dtype=torch.uint8)).view(1, 8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`pack_bits` for a tensor of ``shape``."""
    numel = math.prod(int(d) for d in shape)
    bits = (packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 8)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).view(*shape)


def compress(
    experts: Sequence[Any],
    base: Any,
    out: str | os.PathLike,
    *,
    tall_lambda: float | Sequence[float] = 0.6,
    strategy: Strategy | None = None,
    overwrite: bool = False,
) -> TallCompressed:
    """Store ``experts`` as one merged task vector and one TALL bit-mask per expert.

    Args:
        experts: the experts (paths, state dicts, modules or :class:`~lightning_merge.Expert`).
        base: the model they were fine-tuned from (needed again to recover them).
        out: the local folder to write (written atomically: a crash leaves no folder, or the previous one; a URL
            is refused: compress locally, then upload the folder).
        tall_lambda: λᵢ of the masks, one number or one per expert; larger keeps fewer entries (0.2..0.6 in the
            paper; pick it by the recovered experts' validation scores).
        strategy: how τ_MTL is formed (a strategy with a base; its merged task vector is stored). Default:
            ``TaskArithmetic()``, the sum of the task vectors, as in the paper.
        overwrite: replace an earlier TALL folder at ``out`` (never anything lightning-merge did not write).

    Returns:
        The compressed experts, opened.
    """
    experts_opened, base_expert = open_inputs(experts, base)
    if base_expert is None:
        raise ValueError("TALL compression needs base= the model the experts were fine-tuned from")
    inputs = [s for e in [*experts_opened, base_expert] for s in e.sources()]
    check_output_path(out, overwrite, inputs=inputs, folder=True)
    out = Path(out)
    strategy = strategy or TaskArithmetic()
    n = len(experts_opened)
    lambdas = list(tall_lambda) if isinstance(tall_lambda, (list, tuple)) else [float(tall_lambda)] * n
    if len(lambdas) != n:
        raise ValueError(f"tall_lambda has {len(lambdas)} values for {n} experts; give one or one per expert")
    plan = plan_merge(experts_opened, base_expert, strategy)
    missing = [name for name in plan.names if name not in base_expert]
    if missing:
        raise ValueError(f"tensor '{missing[0]}' is not in the base: TALL masks need every merged tensor in the base")

    shapes = {name: list(plan.spec(name).shape) for name in plan.names}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "experts": unique_names(experts_opened),
        "tall_lambda": lambdas,
        "strategy": strategy.to_dict(),
        "shapes": shapes,
    }
    vector_entries = [(name, TensorSpec(tuple(shape), torch.float32)) for name, shape in shapes.items()]
    mask_entries = [(f"{i}/{name}", TensorSpec(((math.prod(shape) + 7) // 8,), torch.uint8))
                    for i in range(n) for name, shape in shapes.items()]
    tmp = partial_path(out)
    writers: list[ShardWriter] = []
    try:
        with writing(out):  # a full disk or a read-only folder: one error naming the output
            tmp.mkdir(parents=True)
            vectors = ShardWriter(tmp / "task_vector.safetensors", vector_entries, {"format": FORMAT})
            writers.append(vectors)
            masks = ShardWriter(tmp / "masks.safetensors", mask_entries, {"format": FORMAT})
            writers.append(masks)
            for name in plan.names:  # streamed: one tensor of every expert at a time
                base_t = plan.base_tensor(name)
                tensors = plan.expert_tensors(name, base_t)
                merged = plan.prepared.merge_tensor(name, base_t, tensors, plan.stats(name)).sub_(base_t)
                if not math.isfinite(largest_magnitude(merged)):
                    raise ValueError(f"strategy {strategy.name!r} produced NaN or infinite values for tensor "
                                     f"'{name}' from finite inputs; check its arguments ({strategy!r})")
                tau = torch.stack([t - base_t for t in tensors])
                for i, m in enumerate(F.tall_masks(tau, merged, lambdas)):
                    masks.write(f"{i}/{name}", pack_bits(m))
                vectors.write(name, merged.contiguous())
            vectors.close(sync=True)
            masks.close(sync=True)
            write_json(tmp / "tall.json", meta)
            write_record(tmp, {"output": "tall", "experts": meta["experts"]})
            fsync_tree(tmp)
            commit(tmp, out, replace="own" if overwrite else "never")
    finally:  # a failure anywhere (the writers' creation too) leaves no temporary folder behind
        for writer in writers:
            writer.close(sync=False)
        if tmp.exists():
            shutil.rmtree(tmp)
    return TallCompressed(out)


class TallCompressed:
    """A folder written by :func:`compress`: recover each expert as ``θ₀ + mᵢ ⊙ τ_MTL`` on demand.

    Args:
        folder: the folder.

    Attributes:
        experts: the experts' names, in order.
        tall_lambda: the λᵢ used.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "tall.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a TALL-compressed folder: tall.json is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not one "
                             f"this version reads ({FORMAT} v{VERSION}); upgrade lightning-merge")
        self.meta = meta
        self.experts: list[str] = list(meta["experts"])
        self.tall_lambda: list[float] = list(meta["tall_lambda"])
        self.shapes: dict[str, list[int]] = dict(meta["shapes"])

    def _index(self, which: int | str) -> int:
        if isinstance(which, str):
            if which not in self.experts:
                raise KeyError(f"no expert named {which!r} in {self.folder}; it holds {self.experts}")
            return self.experts.index(which)
        if not 0 <= which < len(self.experts):
            raise IndexError(f"expert index {which} out of range: {self.folder} holds {len(self.experts)} experts")
        return which

    def mask(self, which: int | str, name: str) -> Tensor:
        """Expert ``which``'s TALL mask of tensor ``name`` (booleans)."""
        i = self._index(which)
        with SafetensorsFile(self.folder / "masks.safetensors") as f:
            return unpack_bits(f.get(f"{i}/{name}"), self.shapes[name])

    def task_vector(self, name: str) -> Tensor:
        """The stored merged task vector τ_MTL of tensor ``name``."""
        with SafetensorsFile(self.folder / "task_vector.safetensors") as f:
            return f.get(name)

    def iter_expert(self, which: int | str, base: Any) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` of the recovered expert, one tensor at a time (base dtype)."""
        i = self._index(which)
        base_expert = as_expert(base, "base")
        with SafetensorsFile(self.folder / "task_vector.safetensors") as tv, \
                SafetensorsFile(self.folder / "masks.safetensors") as mk:
            for name in base_expert.names():
                theta0 = base_expert.tensor(name)
                if name not in self.shapes:
                    yield name, theta0
                    continue
                if list(theta0.shape) != self.shapes[name]:
                    raise ValueError(f"base tensor '{name}' has shape {list(theta0.shape)}, the compressed experts "
                                     f"{self.shapes[name]}: pass the base they were compressed against")
                mask = unpack_bits(mk.get(f"{i}/{name}"), self.shapes[name])
                value = theta0.to(torch.float32) + tv.get(name).to(torch.float32) * mask
                yield name, cast_checked(value, theta0.dtype, name, "the recovered expert takes the base's dtype: "
                                         "pass the base in that dtype")

    def state_dict(self, which: int | str, base: Any) -> dict[str, Tensor]:
        """The recovered expert ``which`` (index or name) as a state dict."""
        return dict(self.iter_expert(which, base))

    def expert(self, which: int | str, base: Any) -> Expert:
        """The recovered expert as an :class:`~lightning_merge.Expert` (for merging or evaluation)."""
        i = self._index(which)
        return Expert(self.state_dict(i, base), name=f"{self.experts[i]} (TALL)")

    def storage(self) -> dict[str, int]:
        """Bytes on disk: ``task_vector``, ``masks``, ``total``."""
        sizes = {"task_vector": (self.folder / "task_vector.safetensors").stat().st_size,
                 "masks": (self.folder / "masks.safetensors").stat().st_size}
        sizes["total"] = sum(sizes.values()) + (self.folder / "tall.json").stat().st_size
        return sizes

    def density(self) -> dict[str, float]:
        """The fraction of entries each expert's mask keeps."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        out = {}
        with SafetensorsFile(self.folder / "masks.safetensors") as f:
            for i, name in enumerate(self.experts):
                kept = sum(int(unpack_bits(f.get(f"{i}/{t}"), shape).sum()) for t, shape in self.shapes.items())
                out[name] = kept / max(total, 1)
        return out


__all__ = ["TallCompressed", "compress", "pack_bits", "unpack_bits"]
