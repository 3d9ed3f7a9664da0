"""The post-fit Fisher of :class:`~lightning_merge.callbacks.CurvatureCapture`: per-example empirical, true or
exact-expectation Fisher over one of the Trainer's loaders (or any iterable), every rank computing its share and the
sums reduced."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_merge.fisher import compute_fisher

LOADERS = ("val", "train", "test")


def trainer_loader(trainer: Any, which: str | Iterable[Any], estimator: str) -> tuple[Iterable[Any], bool]:
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
        raise ValueError(
            f"CurvatureCapture(fisher_after_fit={estimator!r}, fisher_loader={which!r}): the Trainer has no such "
            "dataloader at fit end; give the module or datamodule one, or pass a DataLoader as fisher_loader"
        )
    return loaders, False


def post_fit_fisher(
    trainer: Any, module: Any, *, estimator: str, loader: str | Iterable[Any], examples: int, samples: int, seed: int
) -> tuple[dict[str, Tensor], int]:
    """``(mean squared per-example gradients by name, M)`` over ``examples`` examples of all ranks together.

    Every rank must call it (it reduces across ranks).
    """
    batches, shard = trainer_loader(trainer, loader, estimator)
    world, rank = trainer.world_size, trainer.global_rank
    if shard and world > 1:
        batches = (b for i, b in enumerate(batches) if i % world == rank)
    per_rank = -(-examples // world)
    device = module.device

    def transfer(batch: Any) -> Any:
        return trainer.strategy.batch_to_device(batch, device)

    sums, count = compute_fisher(
        module,
        batches,
        estimator=estimator,
        num_examples=per_rank,
        samples=samples,
        seed=seed + rank,
        names=[n for n, p in module.named_parameters() if p.requires_grad],
        transfer=transfer,
    )
    if world > 1:  # outside any rank-zero-only code: every rank takes part
        names = list(sums)
        flat = torch.cat([sums[n].reshape(-1) for n in names] + [torch.tensor([float(count)], device=device)])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        count = int(round(flat[-1].item()))
        offset = 0
        for n in names:
            size = sums[n].numel()
            sums[n] = flat[offset: offset + size].view_as(sums[n]).clone()
            offset += size
    return {n: s / count for n, s in sums.items()}, count


__all__ = ["LOADERS", "post_fit_fisher", "trainer_loader"]
