"""The batch Fisher's step weight is unbiased for the per-sequence (token-summed) Fisher when sequences differ in
length (issue 29): token gradients as independent noise with Fisher f, so a sequence of L tokens has Fisher f·L."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.capture.fisher_accumulator import BatchCounts, BatchFisher


def _ratio(accumulate: int, batch: int, steps: int = 1000, width: int = 1024, old: bool = False) -> float:
    """E[wₜ·gₜ²] over the per-sequence Fisher f·E[L] (f = 1, lengths 4–15) for token-mean micro-batches."""
    g = torch.Generator().manual_seed(accumulate * 10 + batch)
    total = 0.0
    for _ in range(steps):
        counts = BatchCounts()
        grad = torch.zeros(width, dtype=torch.float64)
        old_variance = 0.0
        for _ in range(accumulate):
            lengths = torch.randint(4, 16, (batch,), generator=g)
            tokens = int(lengths.sum())
            # a token mean over `tokens` independent unit-variance token gradients (their sum is N(0, tokens)),
            # divided by A as Lightning does
            grad += torch.randn(width, generator=g, dtype=torch.float64) * tokens ** 0.5 / tokens / accumulate
            counts.add(batch, tokens)
            old_variance += batch / tokens ** 2
        if old:
            weight = accumulate ** 2 / old_variance
        else:
            weight, _, _ = BatchFisher().step_weight(counts, world_size=1, accumulate=accumulate)
        total += weight * float((grad ** 2).mean())
    return total / steps / 9.5


@pytest.mark.parametrize("accumulate,batch", [(2, 1), (4, 1), (8, 2)])
def test_the_step_weight_is_unbiased_with_lengths_that_differ(accumulate, batch):
    ratio, before = _ratio(accumulate, batch), _ratio(accumulate, batch, old=True)
    assert abs(ratio - 1.0) < 0.02, ratio
    # the previous weight, (W·A)² / Σ Bₐ/Nₐ², assumed every sequence has the same Fisher: biased low
    assert before < 0.95, before


def test_one_micro_batch_and_example_means_keep_their_weights():
    counts = BatchCounts()
    counts.add(3, 40)  # a token mean over 40 tokens of 3 sequences: N²/B
    assert BatchFisher().step_weight(counts, 1, 1)[0] == pytest.approx(40 ** 2 / 3)
    counts = BatchCounts()
    counts.add(8, 8)  # a mean over 8 examples: B
    counts.add(8, 8)
    assert BatchFisher().step_weight(counts, 1, 2)[0] == pytest.approx(4 / (2 / 8))
    counts = BatchCounts()
    counts.add(5, 1)  # a sum over 5 examples: 1/B
    assert BatchFisher().step_weight(counts, 1, 1)[0] == pytest.approx(1 / 5)
