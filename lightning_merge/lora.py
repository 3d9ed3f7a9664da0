"""LoRA adapters in ΔW space: the weight update ΔW = s·B A of an adapter, and a precision for ΔW from the
statistics captured for A and B (the delta method of ALGORITHMS.md, "LoRA statistics").

Never average A and B separately: (Σ Bᵢ)(Σ Aᵢ) has cross terms Bᵢ Aⱼ no expert learned. Merges happen on ΔW.
"""

from __future__ import annotations

import math

from torch import Tensor


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling s: α / r, or α / √r with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def delta_weight(lora_a: Tensor, lora_b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """ΔW = s · B A (transposed when the layer stores weights as (in, out), PEFT's ``fan_in_fan_out``)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return delta.T.contiguous() if fan_in_fan_out else delta


def delta_precision(
    lora_a: Tensor,
    lora_b: Tensor,
    fisher_a: Tensor,
    fisher_b: Tensor,
    scaling: float,
    *,
    floor: float = 1e-12,
    eps: float = 1e-30,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """A precision (inverse variance) for each entry of ΔW = s·B A from precisions of A and B.

    With independent Gaussian posteriors of precisions F_A, F_B (floored at ``floor``), the delta method gives
    Var(ΔWⱼₖ) ≈ s² Σᵣ (Bⱼᵣ² / F_A[r, k] + A_rₖ² / F_B[j, r]), computed as two matrix products:
    ``s² (B² @ (1/F_A) + (1/F_B) @ A²)``. The precision is 1 / max(Var, eps) (Var is 0 where row Bⱼ· and column
    A·ₖ are both zero: the adapter did not touch that entry, and the precision is then 1/eps, very large; callers
    merging several adapters see the entries other adapters moved weighted by theirs).

    Args:
        lora_a: A, shape (r, in).
        lora_b: B, shape (out, r).
        fisher_a: the precision (Fisher, or second moments) of A, same shape.
        fisher_b: the precision of B, same shape.
        scaling: s.
        floor: F = max(F, floor) before dividing.
        eps: the smallest variance.
        fan_in_fan_out: transpose to the layer's (in, out) storage.

    Returns:
        float32 tensor of ΔW's shape.
    """
    a, b = lora_a.float(), lora_b.float()
    inv_a = 1.0 / fisher_a.float().clamp(min=floor)
    inv_b = 1.0 / fisher_b.float().clamp(min=floor)
    var = (b.square() @ inv_a + inv_b @ a.square()) * (scaling * scaling)
    precision = 1.0 / var.clamp(min=eps)
    return precision.T.contiguous() if fan_in_fan_out else precision


__all__ = ["delta_precision", "delta_weight", "lora_scaling"]
