"""The batch-empirical Fisher accumulator: a running mean (or EMA) over optimizer steps of wₜ·gₜ², where gₜ is the
gradient the optimizer sees and wₜ turns gₜ² into an estimate of the per-example (per-sequence) Fisher from the
step's own counts (ALGORITHMS.md, "Batch Fisher with token-level losses").

With micro-batch (r, a) of rank r holding Bᵣₐ sequences and a loss that is the mean over Nᵣₐ predicted units (tokens;
Nᵣₐ = Bᵣₐ for a per-example mean, Nᵣₐ = 1 for a sum), Lightning divides each micro-batch's loss by the accumulation
A and DDP averages over the W ranks, so g = Σᵣₐ ∇Lᵣₐ/(W·A). The noise model counts the independent contributions
Cᵣₐ to each loss: its tokens for a token mean (Cᵣₐ = Nᵣₐ: a sequence's Fisher grows with its length), its sequences
otherwise (Cᵣₐ = Bᵣₐ); each contributes a Fisher f, so Var(g) ≈ f · Σᵣₐ Cᵣₐ/Nᵣₐ² / (W·A)², and the per-sequence
(token-summed) Fisher of the step's sequences is f · C/B (C = Σ Cᵣₐ, B = Σ Bᵣₐ: the mean tokens per sequence for a
token mean, 1 otherwise). Hence

    wₜ = (W·A)² · (C/B) / Σᵣₐ Cᵣₐ/Nᵣₐ²

B for a per-example mean over B examples, N²/B for a token mean over N tokens of B sequences in one micro-batch. With
micro-batches of different lengths a token mean's weight is not (W·A)² / Σ Bᵣₐ/Nᵣₐ² (which assumes every sequence
has the same Fisher whatever its length: 0.84–0.93 of the per-sequence Fisher with lengths 4–15 and A = 2–8, see
tests/test_llm_path.py). The estimate keeps the squared mean gradient (E[g])² as a bias, as every batch-empirical
Fisher does; it is small when the gradient noise dominates.

Pure torch: no Lightning import, so it is tested directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("auto", "example_mean", "token_mean", "sum")


class BatchCounts:
    """Sequences and predicted tokens of the micro-batches of one optimizer step, on this rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sequences = 0
        self.tokens = 0
        self.contributions = 0  # Σₐ Cₐ: the independent terms of the losses (tokens of a token mean, else sequences)
        self.variance = 0.0  # Σₐ Cₐ / Nₐ² over this rank's micro-batches

    def add(self, sequences: int, units: int) -> None:
        """One micro-batch: ``sequences`` examples and a loss averaged over ``units`` (tokens, examples, or 1).

        A loss averaged over more units than sequences is a token mean: its tokens are its independent terms (a
        sequence's Fisher grows with its length); otherwise (a mean over examples, a sum) its sequences are."""
        if sequences < 0 or units < 0:
            raise ValueError(f"a micro-batch cannot hold {sequences} sequences and {units} predicted units")
        self.sequences += sequences
        self.tokens += units
        terms = max(units, sequences)
        self.contributions += terms
        if units > 0:
            self.variance += terms / (units * units)


class BatchFisher:
    """Running mean (or exponential moving average) of wₜ·gₜ² per parameter.

    Args:
        ema_decay: None for the mean over the run; d in (0, 1) for F ← d·F + (1 − d)·wₜgₜ² (bias-corrected at
            merge time like Adam's second moments).
    """

    def __init__(self, ema_decay: float | None = None):
        self.ema_decay = ema_decay
        self.acc: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.skipped = 0
        self.sequences = 0.0  # Σ over recorded steps of the global sequences
        self.tokens = 0.0  # Σ over recorded steps of the global predicted units
        self.weights = 0.0  # Σ over recorded steps of wₜ

    def step_weight(self, counts: BatchCounts, world_size: int, accumulate: int,
                    reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[float, float, float]:
        """``(wₜ, sequences, tokens)`` of a step from this rank's counts (``reduce`` sums a tensor over ranks)."""
        weight, sequences, tokens, _ = self.step_totals(counts, world_size, accumulate, reduce)
        return weight, sequences, tokens

    def step_totals(self, counts: BatchCounts, world_size: int, accumulate: int,
                    reduce: Callable[[Tensor], Tensor] | None = None,
                    finite: bool = True) -> tuple[float, float, float, bool]:
        """``(wₜ, sequences, tokens, every rank's gradients finite)`` of a step, in ONE reduction over the ranks
        (a collective per recorded step is what the capture costs a sharded step most).

        Args:
            counts: this rank's counts of the step.
            world_size: the number of ranks.
            accumulate: the gradient accumulation.
            reduce: sums a tensor over the ranks (None: one process, or ranks known to agree).
            finite: whether this rank's gradients are finite (:meth:`finite`).
        """
        local = torch.tensor([counts.variance, float(counts.sequences), float(counts.tokens),
                              float(counts.contributions), 0.0 if finite else 1.0], dtype=torch.float64)
        if reduce is not None and world_size > 1:
            total = reduce(local)
        else:
            total = local * world_size
        variance, sequences, tokens, contributions, nonfinite = (float(v) for v in total)
        all_finite = nonfinite == 0
        if variance <= 0 or sequences <= 0:
            return 0.0, sequences, tokens, all_finite
        weight = (world_size * accumulate) ** 2 * (contributions / sequences) / variance
        return weight, sequences, tokens, all_finite

    @staticmethod
    def finite(named: list[tuple[str, Tensor]]) -> bool:
        """Whether every gradient in ``named`` is finite (one fused norm per tensor)."""
        if not named:
            return True
        norms = torch._foreach_norm([g for _, g in named])
        return bool(torch.stack([n.float() for n in norms]).isfinite().all())

    @torch.no_grad()
    def step(self, named: list[tuple[str, Tensor]], weight: float, sequences: float, tokens: float,
             finite: bool | None = None) -> bool:
        """Record one optimizer step's gradients. Returns False (and counts it as skipped) when a gradient is not
        finite (AMP skips those updates too).

        Args:
            named: ``(name, gradient)`` pairs (under FSDP2, this rank's shards: the accumulators are shards too).
            weight: the step weight wₜ (:meth:`step_weight`).
            sequences: the step's sequences over every rank.
            tokens: the step's predicted units over every rank.
            finite: whether every rank's gradients are finite (:meth:`step_totals`; sharded gradients: a shard
                elsewhere may be the non-finite one, and every rank must skip the same steps); None checks this
                rank's.
        """
        if not named:
            return False
        if not (self.finite(named) if finite is None else finite):
            self.skipped += 1
            return False
        groups: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for name, grad in named:
            acc = self.acc.get(name)
            if acc is None:
                acc = self.acc[name] = torch.zeros_like(grad, dtype=torch.float32)
            elif acc.device != grad.device:
                acc = self.acc[name] = acc.to(grad.device)
            n = self.counts.get(name, 0) + 1
            self.counts[name] = n
            groups.setdefault(n, []).append((acc, grad.float() if grad.dtype != torch.float32 else grad))
        for n, pairs in groups.items():  # normally one group: the fused foreach kernels
            accs = [a for a, _ in pairs]
            grads = [g for _, g in pairs]
            if self.ema_decay is None:  # running mean: m ← m·(n−1)/n + w·g²/n
                torch._foreach_mul_(accs, (n - 1) / n)
                torch._foreach_addcmul_(accs, grads, grads, value=weight / n)
            else:
                torch._foreach_mul_(accs, self.ema_decay)
                torch._foreach_addcmul_(accs, grads, grads, value=weight * (1.0 - self.ema_decay))
        self.steps += 1
        self.sequences += sequences
        self.tokens += tokens
        self.weights += weight
        return True

    def metadata(self) -> dict[str, Any]:
        """The sidecar metadata of ``fisher.batch`` (``scale`` 1: the stored values are already per-example)."""
        counts = set(self.counts.values())
        steps = max(self.steps, 1)
        return {
            "estimator": "batch",
            "scale": 1.0,
            "count": counts.pop() if len(counts) == 1 else dict(self.counts),
            "batch_size": self.sequences / steps,  # the mean global effective batch, in sequences
            "tokens_per_step": self.tokens / steps,
            "mean_weight": self.weights / steps,
            "steps_recorded": self.steps,
            "skipped_nonfinite": self.skipped,
            "ema_decay": self.ema_decay,
            "window": "run" if self.ema_decay is None else "ema",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "steps": self.steps, "skipped": self.skipped,
                "sequences": self.sequences, "tokens": self.tokens, "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in dict(state.get("counts", {})).items()}
        self.steps = int(state.get("steps", state.get("recorded", 0)))
        self.skipped = int(state.get("skipped", 0))
        self.sequences = float(state.get("sequences", state.get("batch_total", 0.0)))
        self.tokens = float(state.get("tokens", self.sequences))
        self.weights = float(state.get("weights", self.sequences))
        self.acc = {}

    def restart(self) -> None:
        """Forget everything (a resume whose accumulators are gone)."""
        self.acc, self.counts = {}, {}
        self.steps = 0
        self.sequences = self.tokens = self.weights = 0.0


__all__ = ["REDUCTIONS", "BatchCounts", "BatchFisher"]
