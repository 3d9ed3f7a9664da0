"""Plain functions over stacked task vectors: the pieces every strategy is made of.

Every function takes tensors already in float32 (or float64 in tests) and returns new tensors; none of them
reads files or keeps state. ``x`` of shape ``(N, *shape)`` holds one row per expert.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def keep_count(density: float, numel: int) -> int:
    """Number of entries a top-k with ``density`` keeps: ``max(1, int(density * numel))``, 0 if density <= 0."""
    if density <= 0 or numel == 0:
        return 0
    return min(numel, max(1, int(density * numel)))


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of ``x`` (any shape), ties broken by the lower flat index.

    Uses a selection (``kthvalue``, O(n)) rather than a full sort.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    need = k - int(above.sum())
    equal = flat == threshold
    keep = above | (equal & (torch.cumsum(equal, 0) <= need))
    return keep.view_as(x)


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Top-k of ``|tau|`` per tensor with ``k = keep_count(density, numel)`` (TIES' trim step)."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    return topk_mask(tau.abs(), keep_count(density, tau.numel()))


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask: drop the ``gamma`` largest and the smallest entries so ``density`` remains.

    Exactly mergekit's rule: sort ``|tau|`` ascending (stable), keep positions
    ``[n_bot, n_bot + int(density * n))`` with ``n_bot = max(0, n - int(density * n) - int(gamma * n))``.
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n_bot + target]] = True
    return mask.view_as(tau)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed for one (tensor, expert) pair that does not depend on thread order or Python's hash salt."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_mask(shape: torch.Size, keep_prob: float, seed: int) -> Tensor:
    """Bernoulli(keep_prob) mask drawn from a generator seeded with ``seed`` (DARE's drop step)."""
    if keep_prob >= 1:
        return torch.ones(shape, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < keep_prob


def l1_rescale(original: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """Rescale ``masked`` so its L1 norm matches ``original``'s (mergekit's DARE ``rescale``)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def expand_weights(weights: Tensor, like: Tensor) -> Tensor:
    """Reshape per-expert weights ``(N,)`` to broadcast against ``(N, *shape)``."""
    return weights.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def elect_signs(values: Tensor) -> Tensor:
    """TIES sign election: +1 where the sum over experts is >= 0, else -1."""
    return torch.where(values.sum(dim=0) >= 0, 1.0, -1.0).to(values.dtype)


def combine_task_vectors(
    tau: Tensor, weights: Tensor, *, election: str | None, normalize: bool
) -> Tensor:
    """Combine per-expert task vectors ``tau (N, *shape)`` into one: the shared core of the linear family.

    Args:
        tau: stacked (already sparsified) task vectors.
        weights: per-expert weights, shape ``(N,)``.
        election: ``None`` (plain weighted sum), ``"weighted"`` (mergekit: elect on ``sum(w * tau)``, divide by
            the weights that agree) or ``"unweighted"`` (PEFT: elect on ``sum(tau)``, divide by the count that
            agrees).
        normalize: divide by the divisor above (by ``sum(w)`` without election).
    """
    w = expand_weights(weights, tau)
    weighted = tau * w
    if election is None:
        mixed = weighted.sum(dim=0)
        if normalize:
            divisor = weights.sum()
            mixed = mixed / (divisor if divisor.abs() >= 1e-8 else 1.0)
        return mixed
    if election == "weighted":
        gamma = elect_signs(weighted)
        agree = torch.sign(weighted) == gamma
        divisor = (w * agree).sum(dim=0)
    elif election == "unweighted":
        gamma = elect_signs(tau)
        agree = torch.sign(tau) == gamma
        divisor = agree.sum(dim=0).to(tau.dtype)
    else:
        raise ValueError(f"election must be None, 'weighted' or 'unweighted', got {election!r}")
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed
