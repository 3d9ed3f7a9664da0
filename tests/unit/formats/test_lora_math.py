"""ΔW = s·B A and the delta-method precision of ΔW from the statistics of A and B (ALGORITHMS.md)."""

import pytest
import torch

from lightning_merge.formats.lora import delta_precision, delta_weight, lora_scaling


def test_scaling_and_delta_weight():
    assert lora_scaling(16, 4) == 4.0 and lora_scaling(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(16, 0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(delta_weight(a, b, 2.0), 2.0 * b @ a)
    torch.testing.assert_close(delta_weight(a, b, 2.0, fan_in_fan_out=True), (2.0 * b @ a).T)


def test_delta_precision_equals_the_delta_method_written_as_loops():
    g = torch.Generator().manual_seed(1)
    r, out, inp, s = 3, 4, 5, 1.5
    a, b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    fa, fb = torch.rand(r, inp, generator=g) + 0.1, torch.rand(out, r, generator=g) + 0.1
    got = delta_precision(a, b, fa, fb, s)
    for j in range(out):
        for k in range(inp):
            var = s**2 * sum(b[j, q] ** 2 / fa[q, k] + a[q, k] ** 2 / fb[j, q] for q in range(r))
            assert got[j, k].item() == pytest.approx(1.0 / var.item(), rel=1e-5)
    torch.testing.assert_close(delta_precision(a, b, fa, fb, s, fan_in_fan_out=True), got.T)
    # an entry no factor touches (row of B and column of A both zero) has zero variance: the largest precision
    b0, a0 = b.clone(), a.clone()
    b0[1] = 0
    a0[:, 2] = 0
    p = delta_precision(a0, b0, fa, fb, s, eps=1e-20)
    assert p[1, 2].item() == pytest.approx(1e20) and torch.isfinite(p).all()
    # more precise factors give a more precise ΔW
    assert bool((delta_precision(a, b, 10 * fa, 10 * fb, s) > got).all())
