"""The post-fit passes on a sharded (FSDP2) module: the per-example Fisher (``"example"``, ``"true"``, ``"exact"``)
and the input Gram matrices, equal to what DDP (and so one process, on the same examples) computes.

FSDP2's backward reduce-scatters the gradient averaged over the ranks, so a rank never sees the gradient of its own
example, and its shard of the averaged gradient squared is not a sum of squared per-example gradients. The route
here: every rank runs the SAME example. Each rank reads its share of the loader as under DDP, and in rounds every
rank's next batch is broadcast to all (:func:`shared_batches`); for each example of it, every rank takes the gradient
of log p(y|x), so the reduce-scattered shard is that example's own gradient, and adds its square to an accumulator
laid out as its parameter shard. Nothing is reduced afterwards: each rank holds its shard of the sum over every
rank's examples. Cost: each rank computes every example (world size × the compute of DDP's pass, one backward per
example, no ``vmap``); memory: one shard per statistic plus what one example's forward and backward hold (FSDP2
gathers one layer's parameters at a time). ``requires_gradient_sync(False)`` would give each rank its own example's
gradient, but whole (unsharded) for every parameter at once: not done.

The true Fisher's labels of rank r's batches are drawn from a generator seeded ``seed + r`` in the order rank r reads
them, exactly as DDP's pass draws them, so the result is DDP's to float noise. The Gram pass runs every batch on every
rank (each forward gathers parameters from all ranks, so no rank may skip one) and counts it only on the rank whose
share it is; the sums are then reduced as under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.capture.fisher import (
    ESTIMATORS,
    LogitsFn,
    batch_len,
    batch_passes,
    default_logits_fn,
    labelled,
    limited_batches,
    log_likelihood,
    split_examples,
)
from lightning_merge.capture.grams import GramAccumulator, default_forward, gram_modules
from lightning_merge.capture.sharded import local
from lightning_merge.capture.sharding import is_dtensor

Share = Callable[[Any, int], Any]  # broadcast a picklable value from rank ``src`` to every rank


def shared_batches(batches: Iterable[Any], num_examples: int, *, world: int, share: Share,
                   to_cpu: Callable[[Any], Any], transfer: Callable[[Any], Any]) -> Iterator[tuple[int, Any, int]]:
    """``(source rank, batch, examples in it)`` for every batch of every rank's share, the same on every rank.

    Each rank reads ``num_examples`` examples of ``batches`` (its share; the last batch cut), and in rounds the next
    batch of each rank 0, 1, ... is broadcast (on the CPU, ``to_cpu``) and handed out on every rank after
    ``transfer`` (to the module's device). It ends when a round finds every rank's share read. Collective: every rank
    must consume it to the end.
    """
    mine = limited_batches(batches, num_examples)
    while True:
        item = next(mine, None)
        payload = None if item is None else to_cpu(item[0])
        seen = False
        for src in range(world):
            got = share(payload, src)
            if got is None:
                continue
            seen = True
            batch = transfer(got)
            yield src, batch, batch_len(batch)
        if not seen:
            return


def to_cpu(batch: Any) -> Any:
    """``batch`` with every tensor on the CPU (tensors, tuples and named tuples, lists, mappings; anything else as it
    is), to broadcast it: a loader's batch is normally there already. Not the strategy's ``batch_to_device``, which
    would run the module's batch-transfer hooks a second time."""
    if isinstance(batch, Tensor):
        return batch.cpu()
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_cpu(b) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_cpu(b) for b in batch)
    if isinstance(batch, Mapping):
        moved = {k: to_cpu(v) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    return batch


def _square_into(sums: Mapping[str, Tensor], params: Mapping[str, Tensor], weight: float) -> None:
    """Add ``weight`` × (this rank's shard of each parameter's gradient)² to ``sums``."""
    for name, p in params.items():
        g = p.grad
        if g is None:
            continue
        if is_dtensor(g) and tuple(g.placements) != tuple(p.placements):  # a partial sum (tensor parallelism)
            g = g.redistribute(p.device_mesh, p.placements)
        sums[name].add_(local(g).detach().float().square(), alpha=weight)


def sharded_fisher(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    estimator: str,
    num_examples: int,
    samples: int,
    seed: int,
    world: int,
    share: Share,
    to_cpu: Callable[[Any], Any],
    transfer: Callable[[Any], Any],
    names: Iterable[str],
    logits_fn: LogitsFn | None = None,
) -> tuple[dict[str, Tensor], int]:
    """This rank's shard of Σ over every rank's examples of the squared per-example gradient of log p(y|x), and
    the number of them with a label (a target other than -100: M, the same on every rank). Collective: every rank
    calls it, each with its own share ``batches``.

    Args:
        module: the sharded module (``fully_shard``); its ``fisher_logits`` is used when present.
        batches: this rank's batches (as under DDP: its sampler's shard, or every world-th batch of an iterable).
        estimator: ``"example"``, ``"true"`` or ``"exact"`` (see :func:`lightning_merge.capture.fisher.compute_fisher`).
        num_examples: the examples to read from this rank's ``batches``.
        samples: label draws per example for the true Fisher.
        seed: rank r's batches draw their labels from a generator seeded ``seed + r`` (as DDP's pass).
        world: the number of ranks.
        share: broadcast from a rank (``trainer.strategy.broadcast``).
        to_cpu: moves a batch to the CPU before it is broadcast.
        transfer: moves a received batch to the module's device.
        names: the parameters to compute.
        logits_fn: overrides how a batch becomes ``(logits, targets)``.

    Returns:
        ``(sums, count)``: float32 sums shaped as each parameter's local shard, and M (examples with a label).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    logits_fn = logits_fn or default_logits_fn(module)
    wanted = set(names)
    params = {n: p for n, p in module.named_parameters() if n in wanted}
    sums = {n: torch.zeros_like(local(p.detach()), dtype=torch.float32) for n, p in params.items()}
    generators = [torch.Generator().manual_seed(seed + r) for r in range(world)]
    draws = samples if estimator == "true" else 1
    was_training = module.training
    module.eval()
    count = 0
    try:
        with torch.enable_grad():
            for src, batch, _ in shared_batches(batches, num_examples, world=world, share=share, to_cpu=to_cpu,
                                                transfer=transfer):
                for index, (override, weights, alpha) in enumerate(
                        batch_passes(estimator, logits_fn, batch, draws, generators[src])):
                    for i, example in enumerate(split_examples(batch)):
                        module.zero_grad(set_to_none=True)
                        logits, targets = logits_fn(example)
                        if override is not None:
                            targets = override[i: i + 1]
                        if index == 0 and labelled(targets):  # M counts the examples with a label
                            count += 1
                        log_likelihood(logits, targets).backward()  # reduce-scattered: every rank, same example
                        _square_into(sums, params, alpha * (1.0 if weights is None else float(weights[i])))
    finally:
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return sums, count


def sharded_grams(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    num_examples: int,
    rank: int,
    world: int,
    share: Share,
    to_cpu: Callable[[Any], Any],
    transfer: Callable[[Any], Any],
) -> tuple[dict[str, Tensor], dict[str, int], int]:
    """Σ xxᵀ, rows and examples of this rank's share (as :func:`lightning_merge.capture.grams.compute_grams` gives
    them under DDP), in eval mode without gradients; every rank runs every rank's batches (each forward is a
    collective) and counts only its own. Collective: every rank calls it."""
    layers = gram_modules(module)
    run = default_forward(module)
    current = {"mine": False}
    acc = GramAccumulator(layers, when=lambda _: current["mine"]).attach()
    was_training = module.training
    module.eval()
    count = 0
    try:
        with torch.no_grad():
            for src, batch, size in shared_batches(batches, num_examples, world=world, share=share, to_cpu=to_cpu,
                                                   transfer=transfer):
                current["mine"] = src == rank
                acc.set_batch(batch)
                run(batch)
                if src == rank:
                    count += size
    finally:
        acc.detach()
        module.train(was_training)
    return acc.sums, acc.rows, count


__all__ = ["shared_batches", "sharded_fisher", "sharded_grams", "to_cpu"]
