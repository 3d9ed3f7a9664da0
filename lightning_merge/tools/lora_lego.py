"""LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering", ICLR 2025): LoRA adapters merged rank by rank into one adapter of a chosen rank k.

Each rank of a LoRA, a row aⱼ of A with the column bⱼ of B, is a *minimal semantic unit* (MSU): ΔW = s Σⱼ bⱼ aⱼᵀ is
a sum over units, whatever their order (permutation invariance) and however they are split among adapters
(concatenating adapters' factors sums their ΔW). Per adapted module, the units of every adapter are pooled, clustered
by k-means into k clusters, and each cluster's centroid becomes one rank of the merged adapter. Two rescalings (the
paper's "dual reweighting") follow:

- **parameter reweighting** (norm decay: a mean of units pointing different ways is shorter than they are): each
  centroid μ_c is scaled to the mean norm of its members, μ̂_c = μ_c · mean_{u ∈ C_c} ‖u‖ / ‖μ_c‖;
- **output reweighting** (variance expansion: k units add k terms to the output where an expert has r): the merged
  ΔW is multiplied by √(r̄ / k), r̄ the experts' mean rank at that module.

This works on the factors, not on ΔW, so it is not a :class:`~lightning_merge.strategies.Strategy` (a strategy maps
the experts' tensors to a merged tensor; here a module's tensor is not a function of the experts' ΔW, since the same
ΔW has many factorizations and the clusters depend on the one stored). It is a tool that reads PEFT adapter folders
and writes one (:func:`merge_lora_lego`), with the clustering of one module exposed as :func:`lego_factors`.
docs/lora.md ("Rank-wise clustering: LoRA-LEGO") states the conventions chosen where the paper leaves them open.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.errors import AdapterError
from lightning_merge.files.atomic import commit, fsync_tree, partial_path, writing
from lightning_merge.files.outputs import check_output_path
from lightning_merge.files.ownership import write_record
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.lora import PEFT_PREFIX
from lightning_merge.sources.expert import Expert

REFERENCE = ("Zhao et al., Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through "
             "Rank-Wise Clustering, ICLR 2025 (arXiv:2409.16167)")


def kmeans(points: Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given ``seed``.

    The first centre is drawn uniformly, each further one with probability proportional to its squared distance to
    the nearest centre chosen (k-means++), from a ``torch.Generator`` seeded with ``seed``; then points go to their
    nearest centre (the lowest index on a tie) and centres to their members' mean until no assignment changes or
    ``iterations`` rounds have run. A cluster left empty takes the point farthest from its own centre. In float64.

    Args:
        points: (n, d) points.
        k: the number of clusters, 1 ≤ k ≤ n.
        seed: the seed of the k-means++ draws.
        iterations: the most assignment rounds.

    Returns:
        ``(labels, centroids)``: (n,) cluster indices and (k, d) float64 centroids.

    Raises:
        ValueError: k outside 1..n or ``iterations`` < 1.
    """
    x = points.to(torch.float64)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= the number of points ({n}), got k = {k!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    generator = torch.Generator().manual_seed(int(seed))
    squared = x.square().sum(1)

    def distances(centres: Tensor) -> Tensor:  # (n, m) squared distances
        return (squared.unsqueeze(1) - 2 * x @ centres.T + centres.square().sum(1).unsqueeze(0)).clamp_(min=0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = distances(x[chosen]).squeeze(1)
    while len(chosen) < k:
        total = float(nearest.sum())
        if total > 0:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every point coincides with a centre: the first one not yet chosen
            taken = set(chosen)
            index = next(i for i in range(n) if i not in taken)
        chosen.append(index)
        nearest = torch.minimum(nearest, distances(x[index:index + 1]).squeeze(1))
    centroids = x[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        dist = distances(centroids)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            own = dist.gather(1, new.unsqueeze(1)).squeeze(1)
            movable = counts[new] > 1
            far = int(torch.where(movable, own, torch.full_like(own, -1.0)).argmax())
            counts[new[far]] -= 1
            new[far] = empty
            counts[empty] = 1
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts.unsqueeze(1).to(x.dtype)
    return labels, centroids


@dataclasses.dataclass(frozen=True)
class LegoFactors:
    """One module merged by LoRA-LEGO.

    Attributes:
        a: the merged A, (k, in) (scaling 1: ΔW = B A).
        b: the merged B, (out, k).
        labels: the cluster of each unit, units in the order of the adapters given and of their ranks.
        sizes: the number of units in each cluster (clusters ordered by their first unit).
        parameter_scales: each centroid's factor mean ‖u‖ / ‖μ_c‖ (1 without parameter reweighting).
        output_scale: √(r̄ / k) (1 without output reweighting).
    """

    a: Tensor
    b: Tensor
    labels: Tensor
    sizes: list[int]
    parameter_scales: Tensor
    output_scale: float


def _matrices(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """A as (r, in·kh·kw…) and B as (out, r), float64 (convolution factors flattened)."""
    return lora_a.to(torch.float64).reshape(lora_a.shape[0], -1), lora_b.to(torch.float64).reshape(lora_b.shape[0], -1)


def lego_factors(factors: Sequence[tuple[Tensor, Tensor, float]], rank: int, *, seed: int = 0,
                 iterations: int = 100, reweight_parameters: bool = True, reweight_output: bool = True,
                 where: str = "the module") -> LegoFactors:
    """LoRA-LEGO on one module: the units of every adapter clustered into ``rank`` clusters, one rank per centroid.

    Adapter i's scaling sᵢ is folded into its units as √sᵢ on both factors (a = √sᵢ Aᵢ[j], b = √sᵢ Bᵢ[:, j], so
    b aᵀ summed is sᵢ Bᵢ Aᵢ and units of adapters with different α / r are compared at the size they act with; a
    negative sᵢ goes to b). A unit is the vector [a; b]; k-means (:func:`kmeans`, seeded) clusters the units; each
    centroid μ_c = [ā_c; b̄_c] gives one rank, scaled by the parameter reweighting (μ̂_c = μ_c · mean ‖u‖ / ‖μ_c‖,
    the whole vector, so the rank-1 term b̄ āᵀ moves by the square of that factor) and the output reweighting
    (B · √(r̄ / k), r̄ = the number of units / the number of adapters). Clusters are ordered by their first unit.

    With ``rank`` = the number of units every unit is its own cluster: ΔW = √(r̄ / k) Σᵢ sᵢ Bᵢ Aᵢ, the concatenation's
    ΔW times 1/√N for N adapters of equal rank (1 without output reweighting).

    Args:
        factors: per adapter ``(lora_A, lora_B, scaling)`` as PEFT stores them (A (r, in) or (r, in, kh, kw); B
            (out, r) or (out, r, 1, 1)).
        rank: k, the merged rank (the number of clusters), at most the number of units.
        seed: the k-means++ seed (the same seed gives the same adapter).
        iterations: the most k-means rounds.
        reweight_parameters: rescale each centroid to its members' mean norm (the paper's parameter reweighting).
        reweight_output: multiply ΔW by √(r̄ / k) (the paper's output reweighting).
        where: what the factors are, for messages (a module name).

    Returns:
        :class:`LegoFactors`, A and B float32 in the stored layout (convolutions: (k, in, kh, kw), (out, k, 1, 1)).

    Raises:
        ValueError: no factors, factors whose shapes disagree, or ``rank`` outside 1..the number of units.
    """
    if not factors:
        raise ValueError(f"{where}: no adapter factors to merge")
    a_shape, b_shape = tuple(factors[0][0].shape), tuple(factors[0][1].shape)
    a_units, b_units = [], []
    for i, (lora_a, lora_b, scaling) in enumerate(factors):
        if tuple(lora_a.shape[1:]) != a_shape[1:] or lora_b.shape[0] != b_shape[0] or \
                lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"{where}: adapter {i}'s factors A {list(lora_a.shape)}, B {list(lora_b.shape)} do not "
                             f"fit adapter 0's A {list(a_shape)}, B {list(b_shape)}")
        a, b = _matrices(lora_a, lora_b)
        root = math.sqrt(abs(scaling))
        a_units.append(a * root)
        b_units.append((b * (root if scaling >= 0 else -root)).T)
    units = torch.cat([torch.cat(a_units), torch.cat(b_units)], 1)
    count = units.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= count:
        ranks = ", ".join(str(f[0].shape[0]) for f in factors)
        raise ValueError(f"{where}: rank must be an integer from 1 to the number of units there, {count} (the "
                         f"adapters' ranks {ranks} summed), got {rank!r}")
    labels, centroids = kmeans(units, rank, seed=seed, iterations=iterations)
    first = [int((labels == c).nonzero()[0]) for c in range(rank)]
    order = sorted(range(rank), key=first.__getitem__)
    relabel = torch.empty(rank, dtype=torch.long)
    relabel[torch.tensor(order)] = torch.arange(rank)
    labels, centroids = relabel[labels], centroids[order]
    sizes = torch.bincount(labels, minlength=rank)
    scales = torch.ones(rank, dtype=torch.float64)
    if reweight_parameters:
        mean_norm = torch.zeros(rank, dtype=torch.float64).index_add_(0, labels, units.norm(dim=1)) / sizes
        norm = centroids.norm(dim=1)
        scales = torch.where(norm > 0, mean_norm / torch.where(norm > 0, norm, torch.ones_like(norm)), scales)
        centroids = centroids * scales.unsqueeze(1)
    output = math.sqrt(count / len(factors) / rank) if reweight_output else 1.0
    width = a_units[0].shape[1]
    a = centroids[:, :width].to(torch.float32).reshape(rank, *a_shape[1:]).contiguous()
    b = (centroids[:, width:].T * output).to(torch.float32).reshape(b_shape[0], rank, *b_shape[2:]).contiguous()
    return LegoFactors(a, b, labels, sizes.tolist(), scales, output)


@dataclasses.dataclass(frozen=True)
class LegoMerged:
    """What :func:`merge_lora_lego` wrote.

    Attributes:
        path: the adapter folder.
        rank: the merged rank k of every module.
        modules: per adapted module, the cluster sizes and the output scale.
    """

    path: Path
    rank: int
    modules: dict[str, dict[str, Any]]


def _module_name(module_key: str) -> str:
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def _check_adapters(experts: list[Expert], given: Sequence[Any]) -> list[str]:
    """The modules every adapter adapts (the same set for all), after refusing what LoRA-LEGO has no rule for."""
    for expert, name in zip(experts, given):
        adapter = expert.lora
        if adapter is None:
            raise AdapterError(f"'{name}' is not a LoRA adapter folder: LoRA-LEGO clusters adapters' ranks")
        if adapter.full:
            tensor = sorted(adapter.full)[0]
            raise AdapterError(f"adapter '{adapter.folder}' saves '{tensor}' whole (modules_to_save): LoRA-LEGO "
                               "merges LoRA ranks only; merge such adapters with merge(..., output='peft')")
        if adapter.bias_of:
            raise AdapterError(f"adapter '{adapter.folder}' trains lora_bias ('{sorted(adapter.bias_of)[0]}'): "
                               "LoRA-LEGO has no rule for biases; merge it with merge(..., output='peft')")
    first = experts[0].lora
    targets = sorted(first.modules)
    for expert in experts[1:]:
        other = expert.lora
        missing = sorted(set(targets) - set(other.modules))
        extra = sorted(set(other.modules) - set(targets))
        if missing or extra:
            lacking, module = (other, missing[0]) if missing else (first, extra[0])
            raise AdapterError(
                f"adapter '{lacking.folder}' does not adapt '{module[: -len('.weight')]}', which another adapter "
                f"adapts: LoRA-LEGO clusters the units of one module across all adapters, so they must target the "
                "same modules; retrain with the same target_modules or leave that adapter out")
        fan = {info["fan_in_fan_out"] for info in (first.modules[targets[0]], other.modules[targets[0]])}
        if len(fan) > 1:
            raise AdapterError(f"adapters '{first.folder}' and '{other.folder}' disagree on fan_in_fan_out")
    bases = {str(e.lora_base.path) for e in experts if e.lora_base is not None and e.lora_base.path is not None}
    if len(bases) > 1:
        raise AdapterError(f"the adapters adapt different bases ({', '.join(sorted(bases))}): give base= the one "
                           "model they were all trained on")
    return targets


def merge_lora_lego(adapters: Sequence[str | os.PathLike | Expert], out: str | os.PathLike, *, rank: int,
                    base: str | os.PathLike | Expert | None = None, seed: int = 0, iterations: int = 100,
                    reweight_parameters: bool = True, reweight_output: bool = True, overwrite: bool = False,
                    trust_checkpoint: bool = False) -> LegoMerged:
    """Merge LoRA adapters by LoRA-LEGO into one PEFT adapter folder of rank ``rank``.

    Per adapted module, every adapter's ranks (units) are pooled and clustered into ``rank`` clusters
    (:func:`lego_factors`); the folder holds the centroids as ``lora_A`` / ``lora_B`` with scaling 1
    (``lora_alpha`` = r = ``rank``), and ``peft.PeftModel.from_pretrained(base_model, out)`` loads it. It is written
    under a temporary name, fsync'd and swapped in atomically; ``lightning_merge.json`` records the options, the
    cluster sizes and the output scale of each module.

    Args:
        adapters: PEFT LoRA adapter folders (or :class:`~lightning_merge.Expert` objects opened on them), all over
            the same base and adapting the same modules; ranks and ``lora_alpha`` may differ.
        out: the adapter folder to create.
        rank: k, the merged adapter's rank (the number of clusters per module), at most the adapters' ranks summed.
        base: the model the adapters adapt (default: the local path each adapter's config names).
        seed: the k-means++ seed; the same seed and inputs give the same adapter, bit for bit.
        iterations: the most k-means rounds per module.
        reweight_parameters: scale each centroid to the mean norm of its cluster's units.
        reweight_output: scale each module's ΔW by √(r̄ / k), r̄ the adapters' mean rank there.
        overwrite: replace an earlier output of lightning-merge at ``out``.
        trust_checkpoint: allow unpickling an ``adapter_model.bin`` (trusted files only).

    Returns:
        :class:`LegoMerged`.

    Raises:
        AdapterError: an input that is not a LoRA adapter, adapters targeting different modules (naming the adapter
            and the module) or different bases, ``modules_to_save`` or ``lora_bias`` in an adapter.
        ValueError: fewer than two adapters, or ``rank`` outside 1..the units of a module (naming the module and the
            adapters' ranks there).
    """
    if isinstance(adapters, (str, os.PathLike)) or len(adapters) < 2:
        raise ValueError("merge_lora_lego needs a list of at least two adapters")
    if isinstance(base, (str, os.PathLike)):
        base = Expert(base, trust_checkpoint=trust_checkpoint, name=str(base))
    experts = [adapter if isinstance(adapter, Expert) else Expert(adapter, base=base, trust_checkpoint=trust_checkpoint)
               for adapter in adapters]
    targets = _check_adapters(experts, adapters)
    out = Path(out)
    check_output_path(out, overwrite, inputs=[p for e in experts for p in e.sources()], folder=True)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for target in targets:
        module = target[: -len(".weight")]
        merged = lego_factors(
            [(*e.lora.factors(target), e.lora.modules[target]["scaling"]) for e in experts], rank, seed=seed,
            iterations=iterations, reweight_parameters=reweight_parameters, reweight_output=reweight_output,
            where=f"module '{module}'")
        key = experts[0].lora.modules[target]["module_key"]
        tensors[f"{key}.lora_A.weight"] = merged.a
        tensors[f"{key}.lora_B.weight"] = merged.b
        modules[_module_name(key)] = {"cluster_sizes": merged.sizes, "output_scale": merged.output_scale}
    config = dict(experts[0].lora.config)
    config.update({
        "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {},
        "target_modules": sorted(modules), "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "lora_bias": False, "lora_dropout": 0.0, "init_lora_weights": True,
    })
    tmp = partial_path(out)
    with writing(out):
        tmp.mkdir(parents=True)
        try:
            save_tensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_record(tmp, {
                "kind": "lora-lego", "reference": REFERENCE,
                "adapters": [str(e.lora.folder) for e in experts], "rank": rank, "seed": seed,
                "iterations": iterations, "reweight_parameters": reweight_parameters,
                "reweight_output": reweight_output, "modules": modules,
            })
            fsync_tree(tmp)
            commit(tmp, out, replace="own" if overwrite else "never")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return LegoMerged(out, rank, modules)


__all__ = ["REFERENCE", "LegoFactors", "LegoMerged", "kmeans", "lego_factors", "merge_lora_lego"]
