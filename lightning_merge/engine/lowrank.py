"""Low-rank factors of a merged module's ΔW, as a PEFT adapter stores them: the truncated SVD of a ΔW
(:func:`factor_delta`), or of a product B A from its factors without forming it (:func:`factor_product`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def factor_delta(delta: Tensor, rank: int, fan_in_fan_out: bool) -> tuple[Tensor, Tensor, float]:
    """Truncated SVD of one module's ΔW (float32): ``(A, B, relative error ‖ΔW − BA‖/‖ΔW‖)``, A and B shaped as PEFT
    stores them (convolutions: A (k, in, kh, kw), B (out, k, 1, 1)).

    The leading k singular directions come from the eigenvectors of the smaller Gram matrix (ΔW ΔWᵀ or ΔWᵀ ΔW), and
    the factors from projecting ΔW onto them: B A is the projection of ΔW onto its top-k singular subspace (the
    truncated SVD), balanced as U√Σ and √ΣVᵀ. Computing only that is faster than a full SVD and gives
    its truncation (to float32 rounding where the k-th and (k+1)-th singular values are apart).

    Raises:
        ValueError: the k-th and (k+1)-th singular values are equal (within float32 rounding) and not zero: the
            leading k directions are not defined (any basis of the tied ones is as leading; a flat spectrum, as
            ISO-C's, has none), so the factors would be the machine's choice. It names the rank that cuts no tie
            (the number of non-zero singular values, for which BA is ΔW)."""
    m = delta.T if fan_in_fan_out and delta.dim() == 2 else delta
    out_shape = m.shape
    m = m.reshape(out_shape[0], -1)
    rows, cols = m.shape
    k = min(rank, rows, cols)
    if rows <= cols:
        values, vectors = torch.linalg.eigh(m @ m.T)
        _check_cut(values, k)
        u = vectors[:, -k:].flip(1) if k else vectors[:, :0]  # (rows, k), leading first
        a = u.T @ m  # Σ Vᵀ: row i has norm σᵢ
        sigma = a.norm(dim=1)
        root = sigma.sqrt()
        b = u * root
        a = a / torch.where(root > 0, root, torch.ones_like(root)).unsqueeze(1)
    else:
        values, vectors = torch.linalg.eigh(m.T @ m)
        _check_cut(values, k)
        v = vectors[:, -k:].flip(1) if k else vectors[:, :0]  # (cols, k)
        b = m @ v  # U Σ: column i has norm σᵢ
        sigma = b.norm(dim=0)
        root = sigma.sqrt()
        a = root.unsqueeze(1) * v.T
        b = b / torch.where(root > 0, root, torch.ones_like(root))
    norm = float(m.norm())
    error = float((m - b @ a).norm()) / norm if norm > 0 else 0.0
    a = a.reshape(k, *out_shape[1:]).contiguous()
    b = b.reshape(out_shape[0], k, *([1] * (len(out_shape) - 2))).contiguous()
    return a, b, error


def _check_cut(values: Tensor, k: int) -> None:
    """Refuse a rank-k cut of eigenvalues σ² (ascending) that falls between two equal, non-zero ones."""
    n = values.numel()
    if k == 0 or k >= n:
        return
    top = float(values[-1])
    tol = 16 * n * torch.finfo(values.dtype).eps * top
    kth, next_ = float(values[-k]), float(values[-k - 1])
    # only among the leading values (σ² at least half the top's), where float32's error n·ε·σ₁² is small against
    # them: a flat spectrum (ISO-C's) is tied there, while a fine-tune's tail is merely close, and its cut is
    # defined to float32 rounding (a review: the narrower test refused extract-lora of a real fine-tune)
    if top > 0 and next_ >= top / 2 and kth - next_ <= tol:
        live = int((values > tol).sum())
        raise ValueError(
            f"rank {k} cuts between equal singular values of ΔW (σ{k} = σ{k + 1} = {math.sqrt(max(kth, 0.0)):.4g}): "
            f"its leading {k} directions are not defined (a flat spectrum, as ISO-C's and ISO-CTS's, has none) and "
            f"the adapter would be the machine's choice; write rank {live} or more (ΔW's {live} directions, exactly), "
            "or the full model")


def factor_product(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The truncated SVD of ΔW = B A from its factors (B (out, R, 1…), A (R, in, k…), float32), without forming
    ΔW: B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), then the SVD of the R × R core R_B R_Aᵀ gives ΔW = (Q_B U) Σ (Q_A V)ᵀ.
    Returns ``(A', B', relative error)`` at ``rank`` (shaped as PEFT stores them; columns beyond the product's rank
    are zero), the error ‖ΔW − B'A'‖/‖ΔW‖ from the discarded singular values."""
    out_dim, inner = b.shape[0], b.shape[1]
    a_shape = a.shape
    qb, rb = torch.linalg.qr(b.reshape(out_dim, inner).double())
    qa, ra = torch.linalg.qr(a.reshape(inner, -1).double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    left = (qb @ u[:, :k]) * root  # (out, k)
    right = root.unsqueeze(1) * (vh[:k] @ qa.T)  # (k, in·k…)
    total = float(s.square().sum())
    error = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    if k < rank:  # the requested rank exceeds the product's: zero columns keep the planned shapes
        left = torch.cat([left, left.new_zeros(out_dim, rank - k)], 1)
        right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], 0)
    a_out = right.to(torch.float32).reshape(rank, *a_shape[1:])
    b_out = left.to(torch.float32).reshape(out_dim, rank, *([1] * (len(a_shape) - 2)))
    return a_out, b_out, error


__all__ = ["factor_delta", "factor_product"]
