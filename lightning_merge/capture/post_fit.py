"""The post-fit passes of :class:`~lightning_merge.callbacks.CurvatureCapture`: the per-example empirical, true or
exact-expectation Fisher, and the linear layers' input Gram matrices, over one of the Trainer's loaders (or any
iterable), every rank computing its share and the sums reduced (a sharded module's: see
:mod:`lightning_merge.capture.sharded_post_fit`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_merge.capture.fisher import compute_fisher
from lightning_merge.capture.grams import compute_grams, gram_modules
from lightning_merge.capture.records import FisherPass, GramTotals
from lightning_merge.capture.sharded import like
from lightning_merge.capture.sharded_post_fit import sharded_fisher, sharded_grams, to_cpu
from lightning_merge.capture.sharding import holds_dtensors
from lightning_merge.errors import MissingLoader

LOADERS = ("val", "train", "test")


def trainer_loader(trainer: Any, which: str | Iterable[Any], setting: str) -> tuple[Iterable[Any], bool]:
    """``(loader, shard)``: the Trainer's loader named ``which`` (already sharded by its sampler), or the given
    iterable (``shard``: each rank reads every world_size-th batch)."""
    if not isinstance(which, str):
        return which, True
    loaders = {
        "val": trainer.val_dataloaders,
        "train": trainer.train_dataloader,
        "test": trainer.test_dataloaders,
    }[which]
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise MissingLoader(
            f"CurvatureCapture({setting}, fisher_loader={which!r}): the Trainer has no such "
            "dataloader at fit end; give the module or datamodule one, or pass a DataLoader as fisher_loader"
        )
    return loaders, False


def post_fit_fisher(
    trainer: Any, module: Any, *, estimator: str, loader: str | Iterable[Any], examples: int, samples: int, seed: int
) -> FisherPass:
    """The mean squared per-example gradients by name, and their number M, over ``examples`` examples of all ranks
    together (M = 0 and no values when no rank saw an example).

    Every rank must call it (it reduces across ranks). On a sharded (FSDP2) module every rank runs every rank's
    examples and the values are ``DTensor`` shards laid out as their parameters
    (:func:`lightning_merge.capture.sharded_post_fit.sharded_fisher`).
    """
    batches, per_rank, transfer = _rank_share(trainer, module, loader, f"fisher_after_fit={estimator!r}", examples)
    world, rank, device = trainer.world_size, trainer.global_rank, module.device
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if holds_dtensors(module):  # every rank runs every example; each holds its shard of the sum (no reduction)
        sums, count = sharded_fisher(module, batches, estimator=estimator, num_examples=per_rank, samples=samples,
                                     seed=seed, names=names, transfer=transfer, **_sharing(trainer))
        if count == 0:
            return FisherPass()
        params = dict(module.named_parameters())
        return FisherPass({n: like(s / count, params[n]) for n, s in sums.items()}, count)
    sums, count = compute_fisher(
        module,
        batches,
        estimator=estimator,
        num_examples=per_rank,
        samples=samples,
        seed=seed + rank,
        names=names,
        transfer=transfer,
        allow_empty=True,  # this rank's share may be empty: the count over every rank decides
    )
    if world > 1:  # outside any rank-zero-only code: every rank takes part
        names = list(sums)
        *parts, total = reduce_sum(trainer, [sums[n] for n in names] + [torch.tensor([float(count)], device=device)])
        sums = dict(zip(names, parts))
        count = int(round(total.item()))
    if count == 0:  # no rank saw an example: no estimate (the caller warns and leaves it out)
        return FisherPass()
    return FisherPass({n: s / count for n, s in sums.items()}, count)


def reduce_sum(trainer: Any, parts: list[Tensor]) -> list[Tensor]:
    """Each tensor summed over ranks, in one all-reduce of their concatenation (every rank must call it; one
    process: the tensors as they are)."""
    if trainer.world_size <= 1:
        return parts
    flat = trainer.strategy.reduce(torch.cat([p.reshape(-1) for p in parts]), reduce_op="sum")
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset: offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    return out


def _rank_share(trainer: Any, module: Any, loader: str | Iterable[Any], setting: str,
                examples: int) -> tuple[Iterable[Any], int, Any]:
    """This rank's batches, its number of examples, and the transfer of a batch to the module's device."""
    batches, shard = trainer_loader(trainer, loader, setting)
    world, rank = trainer.world_size, trainer.global_rank
    if shard and world > 1:
        batches = (b for i, b in enumerate(batches) if i % world == rank)
    device = module.device

    def transfer(batch: Any) -> Any:
        return trainer.strategy.batch_to_device(batch, device)

    return batches, -(-examples // world), transfer


def _sharing(trainer: Any) -> dict[str, Any]:
    """The world size, the broadcast from a rank and the move to the CPU that :mod:`.sharded_post_fit` takes."""
    strategy = trainer.strategy
    return {"world": trainer.world_size, "share": lambda obj, src: strategy.broadcast(obj, src), "to_cpu": to_cpu}


def reduce_grams(trainer: Any, layers: dict[str, Any], sums: dict[str, Tensor], rows: dict[str, int],
                 examples: int = 0) -> GramTotals:
    """Σ xxᵀ, rows and examples summed over ranks (every rank must call it), on the CPU in float32; a layer a rank
    never saw counts as zeros there."""
    device = trainer.lightning_module.device
    names = sorted(layers)
    parts = [sums[n].to(device) if n in sums else torch.zeros(layers[n].in_features, layers[n].in_features,
                                                               device=device) for n in names]
    counts = torch.tensor([float(rows.get(n, 0)) for n in names] + [float(examples)], dtype=torch.float64,
                          device=device)
    parts = reduce_sum(trainer, parts)
    counts = reduce_sum(trainer, [counts])[0].cpu().tolist()  # float64: row counts stay exact
    return GramTotals({n: p.detach().to("cpu", torch.float32).clone() for n, p in zip(names, parts)},
                      {n: int(round(c)) for n, c in zip(names, counts)}, int(round(counts[-1])))


def post_fit_grams(trainer: Any, module: Any, *, loader: str | Iterable[Any],
                   examples: int) -> GramTotals:
    """Σ xxᵀ and rows by weight name over ``examples`` examples of all ranks together (and the examples read), in
    eval mode. Every rank must call it (it reduces across ranks)."""
    batches, per_rank, transfer = _rank_share(trainer, module, loader, "gram='after_fit'", examples)
    layers = gram_modules(module)
    if holds_dtensors(module):  # every forward is a collective: every rank runs every rank's batches
        sums, rows, count = sharded_grams(module, batches, num_examples=per_rank, rank=trainer.global_rank,
                                          transfer=transfer, **_sharing(trainer))
    else:
        sums, rows, count = compute_grams(module, batches, num_examples=per_rank, transfer=transfer,
                                          allow_empty=True)
    return reduce_grams(trainer, layers, sums, rows, count)


__all__ = [
    "LOADERS",
    "MissingLoader",
    "post_fit_fisher",
    "post_fit_grams",
    "reduce_grams",
    "reduce_sum",
    "trainer_loader",
]
