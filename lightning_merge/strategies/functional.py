"""Plain functions over stacked task vectors: the pieces every strategy is made of.

Every function takes tensors already in float32 (or float64 in tests) and returns new tensors; none of them
reads files or keeps state. ``x`` of shape ``(N, *shape)`` holds one row per expert.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

#: Adam's β₁, β₂ and ε (torch.optim.Adam's defaults, which WUDI's and DOGE's references use)
ADAM = (0.9, 0.999, 1e-8)


def thin_svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)``, retried in float64 where it fails to converge.

    LAPACK's divide-and-conquer SVD (gesdd, torch's only CPU driver) can fail on matrices with many repeated or zero
    singular values in float32: the gathered singular vectors of low-rank (LoRA) task vectors did, in ISO-CTS on the
    MiniLM LoRA experts (seed 1). The float64 retry converges there; its factors come back in ``m``'s dtype. A matrix
    on which it converges gets exactly ``torch.linalg.svd``'s factors (the references', FusionBench's, which have no
    retry and stop with the error instead).

    Raises:
        torch.linalg.LinAlgError: the float64 SVD did not converge either (a non-finite matrix, usually).
    """
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        if m.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def rounding_noise(weights: Tensor) -> float:
    """A bound on the float32 rounding a task vector θ − θ₀ carries when θ (``weights``) was stored or computed in
    float32 (an expert's weights, an adapter's θ₀ + ΔW): ε · ‖θ‖_F (each entry is off by at most ε/2 of itself).
    For updates small next to the weights (LoRA on a wide layer) this noise, full-rank, is far above σ₁(τ) · ε."""
    return float(torch.linalg.vector_norm(weights.float())) * torch.finfo(torch.float32).eps


def ranked_svd(m: Tensor, scale: Tensor | float | None = None, floor: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`thin_svd` of a 2-D ``m`` with the triplets past its numerical rank zeroed (u's columns, s, vh's rows).

    The numerical rank is numpy's ``matrix_rank`` default: the singular values above σ₁ · max(rows, cols) · ε (ε
    of ``m``'s dtype; a zero matrix has rank 0), and above ``floor``. Below it the singular vectors are rounding
    noise or, for a rank-deficient matrix (a LoRA expert's task vector: rank 8 of 384), an orthonormal basis of the
    null space that LAPACK is free to choose, and chooses differently on another CPU. A rule that keeps singular
    vectors regardless of their singular values (TSV-M's orthogonalisation, ISO-C's flat spectrum, DOGE's shared
    subspace, a polar factor) would carry that choice into the merge; with them zeroed its result is one answer on
    every machine. Where ``m`` has full numerical rank these are :func:`thin_svd`'s factors, unchanged.

    Args:
        m: the matrix.
        scale: the size that σ₁ stands for in the tolerance, where ``m`` is what is left of a larger matrix (a
            residual τ − UUᵀτ, whose own σ₁ is rounding noise when nothing is left): that matrix's norm. None: m's
            own σ₁.
        floor: an absolute tolerance, the size of noise ``m`` carries from elsewhere: a task vector's
            :func:`rounding_noise` (the float32 rounding of θ, which a small update does not dominate).
    """
    u, s, vh = thin_svd(m)
    if s.numel():
        size = s[0] if scale is None else torch.as_tensor(scale, dtype=s.dtype)
        null = s <= torch.clamp(size * max(m.shape) * torch.finfo(m.dtype).eps, min=floor)
        if bool(null.any()):
            u[:, null] = 0
            s[null] = 0
            vh[null] = 0
    return u, s, vh


def adam_descent(start: Tensor, gradient: Callable[[Tensor], Tensor], iterations: int, lr: float) -> Tensor:
    """``iterations`` steps of Adam from ``start`` (a new tensor; ``start`` is left alone): torch.optim.Adam's update
    written out (β₁ 0.9, β₂ 0.999, ε 1e-8, no weight decay), ``gradient(x)`` giving the (new) gradient at x."""
    x = start.clone()
    beta1, beta2, eps = ADAM
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for step in range(1, iterations + 1):
        grad = gradient(x)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    return x

def keep_count(density: float, numel: int) -> int:
    """Number of entries a top-k with ``density`` keeps: ``max(1, int(density * numel))``, 0 if density <= 0."""
    if density <= 0 or numel == 0:
        return 0
    return min(numel, max(1, int(density * numel)))


def kth_largest(x: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of a flat tensor (1 ≤ k ≤ numel), exactly.

    Non-negative float32 values order like their int32 bit patterns, so a two-pass radix select (a histogram of
    the high 16 bits, then of the low 16 bits inside the chosen bin) finds it in O(n) with two ``bincount``
    calls: about 4× faster than ``torch.kthvalue`` on the CPU. Other inputs use ``kthvalue``.
    """
    if x.dtype != torch.float32 or bool((x < 0).any()):
        return torch.kthvalue(x, x.numel() - k + 1).values
    bits = x.contiguous().view(torch.int32)
    # the high 16 bits of each value, as a strided int16 view (no shift pass; non-negative floats keep them < 2¹⁵)
    high = bits.view(torch.int16)[1::2] if sys.byteorder == "little" else bits.view(torch.int16)[0::2]
    at_or_above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0).flip(0)
    top = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[top + 1]) if top + 1 < at_or_above.numel() else 0
    low = bits[high == top] & 0xFFFF
    low_at_or_above = torch.bincount(low, minlength=1 << 16).flip(0).cumsum(0).flip(0)
    bottom = int(torch.nonzero(low_at_or_above >= k - above).max())
    return torch.tensor((top << 16) | bottom, dtype=torch.int32).view(torch.float32)


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of ``x`` (any shape), ties broken by the lower flat index.

    Uses a selection (:func:`kth_largest`, O(n)) rather than a sort.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    keep = flat >= threshold
    excess = int(torch.count_nonzero(keep)) - k
    if excess > 0:  # entries tied at the threshold: keep the first ones (lower flat index), drop the last `excess`
        tied = torch.nonzero(flat == threshold).squeeze(1)
        keep[tied[tied.numel() - excess:]] = False
    return keep.view_as(x)


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Top-k of ``|tau|`` per tensor with ``k = keep_count(density, numel)`` (TIES' trim step)."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    k = keep_count(density, tau.numel())
    if k >= int(torch.count_nonzero(tau)):
        # The threshold is 0: every non-zero entry is kept, and a kept zero contributes nothing.
        return tau != 0
    return topk_mask(tau.abs(), k)


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask: drop the ``gamma`` largest and the smallest entries so ``density`` remains.

    Exactly mergekit's rule: sort ``|tau|`` ascending (stable), keep positions
    ``[n_bot, n_bot + int(density * n))`` with ``n_bot = max(0, n - int(density * n) - int(gamma * n))``.
    Computed with two O(n) selections instead of the sort (3.5× faster on a 4096² tensor): an entry's ascending
    stable rank is at least r exactly when it is among the ``n − r`` largest, ties going to the higher index.
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    flipped = tau.abs().reshape(-1).flip(0)  # topk_mask prefers the lower index: flip to prefer the higher

    def rank_at_least(r: int) -> Tensor:
        return topk_mask(flipped, n - r).flip(0)

    mask = rank_at_least(n_bot) & ~rank_at_least(n_bot + target)
    return mask.view_as(tau)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed for one (tensor, expert) pair that does not depend on thread order or Python's hash salt."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


#: random draws come in blocks of this many entries (in a tensor's flat order), each from a generator of its own
#: seeded by the tensor's seed and the block's index: any range of a tensor's entries (a chunk of its rows) is drawn
#: alone with the same numbers as in the whole tensor
DRAW_BLOCK = 1 << 16

_MASK64 = (1 << 64) - 1


def _block_seed(seed: int, block: int) -> int:
    """SplitMix64 of (seed, block): a generator seed per block, uncorrelated between neighbouring blocks."""
    z = (seed + (block + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def uniform_draws(seed: int, start: int, count: int) -> Tensor:
    """Uniform [0, 1) float32 draws for entries ``start .. start + count − 1`` (flat order) of a tensor whose draws are
    seeded with ``seed``: the same numbers whichever range is asked for (see :data:`DRAW_BLOCK`)."""
    if count <= 0:
        return torch.empty(0)
    out = torch.empty(count)
    stop = start + count
    for b in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1):  # each block's draws into their place
        low, high = max(start, b * DRAW_BLOCK), min(stop, (b + 1) * DRAW_BLOCK)
        generator = torch.Generator().manual_seed(_block_seed(seed, b))
        if high - low == DRAW_BLOCK:
            out[low - start:high - start].uniform_(generator=generator)
        else:  # a block cut by the range: its draws from its start, the range's part of them
            block = torch.rand(high - b * DRAW_BLOCK, generator=generator)
            out[low - start:high - start] = block[low - b * DRAW_BLOCK:]
    return out


def random_mask(shape: torch.Size, keep_prob: float, seed: int, start: int = 0) -> Tensor:
    """Bernoulli(keep_prob) mask of a tensor's entries ``start ..`` (flat order; a chunk of rows begins at its first
    row × the row's size) drawn with :func:`uniform_draws` (DARE's drop step)."""
    if keep_prob >= 1:
        return torch.ones(shape, dtype=torch.bool)
    return uniform_draws(seed, start, math.prod(shape)).view(shape) < keep_prob


def della_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities (MagPrune): along each row (``dim=1``; a 1-D tensor is one row), the entry of
    ascending magnitude rank r ∈ {0, …, n−1} is kept with probability ``density − ε + 2ε·r/(n−1)``, so the larger
    entries are kept more often and the row keeps ``density`` of its entries on average (mergekit's
    ``della_magprune``). Ties in magnitude rank by the lower index first (mergekit's ``argsort`` is unstable there).
    A row of one entry, where mergekit's rank normalisation divides 0 by 0 and fails, is kept with ``density``.
    """
    x = tau.unsqueeze(0) if tau.dim() < 2 else tau
    n = x.shape[1]
    if n < 2:
        return torch.full_like(tau, density)
    dtype = tau.dtype if tau.is_floating_point() else torch.float32
    exact = dtype if n <= 1 / torch.finfo(dtype).eps else torch.float64  # every rank exact in it
    # the probability of each rank, computed once per row length (the same rounding as rank by rank)
    table = torch.arange(n, dtype=exact).mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon).to(dtype)
    if x.dtype == torch.float32 and x.device.type == "cpu" and n < 1 << 31:  # numpy's sort: CPU tensors only
        rows = x.movedim(1, -1).reshape(-1, n) if x.dim() > 2 else x  # each ranked fibre as a row
        order = _magnitude_order(rows)
        probs = torch.empty(order.shape, dtype=dtype).scatter_(1, order, table.expand_as(order))
        if x.dim() > 2:
            probs = probs.view(*x.movedim(1, -1).shape).movedim(-1, 1).contiguous()
        return probs.view(tau.shape)
    magnitude = x.abs()
    order = torch.argsort(magnitude, dim=1, stable=True)
    probs = torch.empty(order.shape, dtype=dtype).scatter_(1, order, table.view(1, n, *[1] * (x.dim() - 2))
                                                           .expand_as(order))
    return probs.view(tau.shape)


def _magnitude_order(rows: Tensor) -> Tensor:
    """The columns of each row of the float32 matrix ``rows`` in ascending |x|, ties by the lower index first (what
    ``torch.argsort(rows.abs(), dim=1, stable=True)`` gives), as int64. A non-negative float's bits order as it does,
    so an entry's key is its |x| bits above its column index: the keys are distinct, and numpy's (SIMD, unstable)
    sort of them orders each row as the stable argsort does, about 10× faster on 1024–2816-wide rows (2026-12-07)."""
    import numpy as np

    m, n = rows.shape
    bits = rows.detach().abs().view(torch.int32).numpy()
    key = np.empty((m, n), dtype=np.int64)
    np.left_shift(bits, 32, out=key, dtype=np.int64)
    np.bitwise_or(key, np.arange(n, dtype=np.int64), out=key)
    key.sort(axis=1)
    np.bitwise_and(key, 0xFFFFFFFF, out=key)  # the columns, in the sorted order
    return torch.from_numpy(key)


def row_l1(x: Tensor) -> list[float]:
    """Σ|x| of each row (first axis; a 0-/1-D tensor is one row) in float64: a row's sum is the same whether the row
    is read alone, in a chunk or in the whole tensor."""
    rows = x.shape[0] if x.dim() > 1 else 1
    flat = x.to(torch.float64, copy=True).abs_().reshape(rows, -1)  # a copy: x is left as is
    if rows == 1:  # a sum with one output is split over torch's threads (its floats depend on their count): the
        # row viewed twice is summed as a row of a matrix is, each row by one thread
        flat = flat.contiguous()
        return flat.as_strided((2, flat.shape[1]), (0, 1)).sum(1)[:1].tolist()
    return flat.sum(1).tolist()


def exact_l1(x: Tensor) -> float:
    """Σ|x|: the rows' float64 sums (:func:`row_l1`) added exactly (``math.fsum``), so the same however the rows
    were read."""
    return math.fsum(row_l1(x))


def l1_factor(before: float, after: float, eps: float = 1e-7) -> float | None:
    """The factor that gives a masked task vector the L1 norm ``before`` of the original (``after``: its own); None
    where either is below ``eps`` (left as is: mergekit's DARE ``rescale``)."""
    if before < eps or after < eps:
        return None
    return before / after


def fisher_precision(fisher: Tensor, floor: float = 1e-6, eps: float = 0.0) -> Tensor:
    """Fisher merging's elementwise weight ``max(F, floor) + eps`` (a new tensor)."""
    out = fisher.clamp(min=floor)
    return out.add_(eps) if eps else out


def ota_precision(v: Tensor, power: float = 0.5, eps: float = 1e-8, mean_normalize: bool = False) -> Tensor:
    """OTA's elementwise weight ``v̂ᵖ + eps``, optionally divided by its tensor mean (a new tensor)."""
    out = v.pow(power) if power != 1 else v.clone()
    if eps:
        out.add_(eps)
    if mean_normalize:
        out.div_(out.mean().clamp(min=torch.finfo(torch.float32).tiny))
    return out


def accumulate_precision(num: Tensor, den: Tensor, precision: Tensor, x: Tensor) -> None:
    """One expert's term of a precision-weighted mean, in place: ``den += P``, ``num += P ⊙ x``."""
    den.add_(precision)
    num.addcmul_(precision, x)


def precision_quotient(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (a coordinate no expert weighs stays at the base)."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(den > 0, num / den.clamp(min=tiny), torch.zeros_like(num))


def precision_mean(tau: Tensor, precisions: Iterable[Tensor], election: str | None) -> Tensor:
    """``Σ Pᵢ τᵢ / Σ Pᵢ`` over stacked task vectors ``tau (N, *shape)`` and per-expert precisions (already
    multiplied by the scalar weights): over every expert without election (``precisions`` may then be a generator,
    one precision alive at a time), over the agreeing entries with it (TIES' disjoint mean, weighted by the
    precisions; the sign is elected on ``Σ Pᵢτᵢ`` for ``"weighted"`` and on ``Σ τᵢ`` for ``"unweighted"``)."""
    if election is not None:
        precisions = list(precisions)
        if election == "weighted":
            signed = torch.zeros_like(tau[0])
            for p, t in zip(precisions, tau):
                signed.addcmul_(p, t)
        else:
            signed = tau.sum(0)
        positive = signed >= 0
        for p, t in zip(precisions, tau):
            p.mul_(torch.where(positive, t > 0, t < 0))
    num = torch.zeros_like(tau[0])
    den = torch.zeros_like(tau[0])
    for p, t in zip(precisions, tau):
        accumulate_precision(num, den, p, t)
    return precision_quotient(num, den)


def weighted_sum(tensors: list[Tensor], weights: Tensor, normalize: bool) -> Tensor:
    """``Σ wᵢ xᵢ`` (divided by ``Σ wᵢ`` when ``normalize``), accumulated in place without stacking the inputs.
    Strategies refuse weights that sum to 0 when they are built (``normalizing_sum``); a zero sum reaching this
    function divides by 0, and the merge refuses the non-finite result."""
    ws = weights.tolist()
    out = tensors[0] * ws[0]
    for w, x in zip(ws[1:], tensors[1:]):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(math.fsum(ws))
    return out


def combine_task_vectors(
    tau: Tensor, weights: Tensor, *, election: str | None, normalize: bool, inplace: bool = False
) -> Tensor:
    """Combine per-expert task vectors ``tau (N, *shape)`` into one: the shared core of the linear family.

    Args:
        tau: stacked (already sparsified) task vectors.
        weights: per-expert weights, shape ``(N,)``.
        election: ``None`` (plain weighted sum), ``"weighted"`` (mergekit: elect on ``sum(w * tau)``, divide by
            the weights that agree) or ``"unweighted"`` (PEFT: elect on ``sum(tau)``, divide by the count that
            agrees).
        normalize: divide by the divisor above (by ``sum(w)`` without election).
        inplace: ``tau`` is the caller's to give away: the election works in it instead of in a copy.
    """
    if election is None:
        return weighted_sum(list(tau), weights, normalize)
    if election not in ("weighted", "unweighted"):
        raise ValueError(f"election must be None, 'weighted' or 'unweighted', got {election!r}")
    return _elect_and_combine(tau if inplace else tau.clone(), weights.tolist(), election, normalize)


ELECTION_CHUNK = 1 << 16  # entries per expert processed at once: the chunk's temporaries stay in the CPU's cache


def _elect_and_combine(buf: Tensor, ws: list[float], election: str, normalize: bool) -> Tensor:
    """TIES election on a stacked buffer that is modified in place, in chunks of :data:`ELECTION_CHUNK` entries.

    With γ = ±1 the elected sign, the disjoint sum Σᵢ bᵢ·[γbᵢ > 0] is computed as γ·Σᵢ relu(γbᵢ): the same floats
    (γbᵢ is exact, and the kept terms are summed in the same order), in fewer passes. Chunks keep the temporaries in
    cache; together 1.6× faster than whole-tensor passes on a 4096² tensor (``benchmarks/strategy_cost.py``).
    """
    n = len(ws)
    flat = buf.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=buf.dtype, device=buf.device)
    w = torch.tensor(ws, dtype=buf.dtype, device=buf.device).view(n, 1)
    uniform = all(x == ws[0] for x in ws)
    for start in range(0, flat.shape[1], ELECTION_CHUNK):
        b = flat[:, start:start + ELECTION_CHUNK]
        if election == "weighted" and not (uniform and ws[0] == 1.0):
            b.mul_(w)  # mergekit: elect on Σ wᵢτᵢ (and sum the weighted τ)
        gamma = torch.where(b.sum(dim=0) >= 0, 1.0, -1.0)  # γ = +1 where the sum is >= 0
        gb = b.mul_(gamma)  # γbᵢ; an entry agrees where γbᵢ > 0 (a zero never does)
        agree = gb > 0 if normalize else None
        kept = gb.clamp_(min=0)
        if election == "unweighted":
            kept.mul_(w)  # PEFT: elect on Σ τᵢ, sum Σ wᵢτᵢ over the agreeing entries
        mixed = kept.sum(dim=0).mul_(gamma)
        if agree is not None:
            if election == "weighted" and not uniform:
                divisor = agree.to(b.dtype).mul_(w).sum(dim=0)  # the weights that agree
            else:
                divisor = agree.sum(dim=0, dtype=b.dtype)  # the count that agrees (× the common weight)
                if election == "weighted" and ws[0] != 1.0:
                    divisor.mul_(ws[0])
            mixed.div_(torch.where(divisor == 0, 1.0, divisor))
        out[start:start + ELECTION_CHUNK] = mixed
    return out.view(buf.shape[1:])


#: how many entries a tensor's last incomplete group of g < m entries keeps (CABS' ``last_group``)
LAST_GROUP_RULES = ("density", "pad", "drop")


def last_group_quota(n: int, m: int, g: int, rule: str = "density") -> int:
    """The entries a last group of ``g`` of ``m`` entries keeps under n:m: ``"density"`` ⌈n·g/m⌉ (the same density;
    this project's rule), ``"pad"`` min(n, g) (n of the group zero-padded to m: the mergekit CABS plugin),
    ``"drop"`` 0 (the group is skipped: the official CABS RoBERTa script)."""
    if g >= m:
        return min(n, m)
    if rule == "density":
        return min(-(-n * g // m), g)
    if rule == "pad":
        return min(n, g)
    if rule == "drop":
        return 0
    raise ValueError(f"last_group must be one of {', '.join(LAST_GROUP_RULES)}, got {rule!r}")


def nm_mask(tau: Tensor, n: int, m: int, free: Tensor | None = None, fill: bool = False,
            last: str = "density") -> Tensor:
    """Balanced n:m sparsification (CABS' BS step): in each run of ``m`` consecutive entries (row-major), keep the
    ``n`` largest ``|tau|`` among the ``free`` positions.

    A group with fewer than ``n`` free positions keeps all of them, and with ``fill`` then the largest ``|tau|``
    among its other positions up to ``n`` (the intent of the official CABS 7B script); without ``fill`` it keeps
    only its free positions (the mergekit CABS plugin and the official RoBERTa script, whose later expert's top-n
    lands on zeroed entries). A last incomplete group of ``g < m`` entries keeps :func:`last_group_quota` of
    them (``last``). Ties are broken by the lower flat index.

    float32 input is ranked by one ``topk`` per group on unique integer keys (the value's bit pattern, then the
    reversed position), about 3× faster than sorting each group; other dtypes sort.

    Args:
        tau: the task vector (any shape).
        n: entries kept per group.
        m: group size.
        free: boolean mask of the positions that may be chosen (None: all).
        fill: in a group with fewer than its quota of free positions, complete the quota from the other positions.
        last: the rule of the last incomplete group: ``"density"``, ``"pad"`` or ``"drop"`` (see
            :func:`last_group_quota`).

    Returns:
        A boolean mask of ``tau``'s shape.
    """
    numel = tau.numel()
    tail = numel - (-(-numel // m) - 1) * m if numel else 0
    tail_quota = last_group_quota(n, m, tail, last)
    if n >= m and free is None and tail_quota >= tail:
        return torch.ones_like(tau, dtype=torch.bool)
    if n <= 0 or numel == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    groups = -(-numel // m)
    valid = torch.zeros(groups * m, dtype=torch.bool)
    valid[:numel] = True if free is None else free.reshape(-1)
    valid = valid.view(groups, m)
    magnitude = torch.zeros(groups * m, dtype=tau.dtype)
    magnitude[:numel] = tau.reshape(-1).abs()
    magnitude = magnitude.view(groups, m)
    if tau.dtype == torch.float32:
        key = magnitude.view(torch.int32).to(torch.int64) * m + (m - 1 - torch.arange(m))
    else:  # rank by a stable sort: rank r of an entry → key m − 1 − r (unique, larger is better)
        order = torch.sort(magnitude, dim=1, descending=True, stable=True).indices
        key = torch.empty_like(order)
        key.scatter_(1, order, (m - 1 - torch.arange(m)).expand(groups, m).contiguous())
    key_all = key.clone() if fill and free is not None else None  # every position's key, for the fill
    key.masked_fill_(~valid, -1)

    def top(rows: Tensor, k: int) -> Tensor:
        k = min(k, m)
        if k <= 0:
            return torch.zeros_like(rows, dtype=torch.bool)
        threshold = torch.topk(rows, k, dim=-1).values[..., -1:]
        return (rows >= threshold) & (rows >= 0)

    keep = top(key, n)
    quota = torch.full((groups,), min(n, m), dtype=torch.int64)
    if tail < m:
        quota[-1] = tail_quota
        keep[-1] = top(key[-1], tail_quota)
    if key_all is not None:
        need = (quota - keep.sum(1)).clamp(min=0)
        rows = need.nonzero().squeeze(1)
        if rows.numel():  # the largest of the positions not free (and inside the tensor) up to each group's quota
            in_range = torch.zeros(groups * m, dtype=torch.bool)
            in_range[:numel] = True
            others = torch.where(~valid[rows] & in_range.view(groups, m)[rows], key_all[rows], -1)
            width = int(need[rows].max())
            values, index = torch.topk(others, width, dim=1)
            chosen = (torch.arange(width) < need[rows].unsqueeze(1)) & (values >= 0)
            extra = torch.zeros_like(others, dtype=torch.bool)
            extra.scatter_(1, index, chosen)
            keep[rows] |= extra
    return keep.reshape(-1)[:numel].view_as(tau)


def cabs_masks(tau: Tensor, n: int, m: int, order: list[int] | None = None, *, overlap: str = "fill",
               last: str = "density") -> Tensor:
    """CABS' conflict-aware masks for stacked task vectors ``tau (N, *shape)``: experts are pruned in ``order``;
    each chooses its n:m among the positions that no earlier expert took (only non-zero kept entries take a
    position); a group with fewer than n free positions completes its n with the largest |τ| among the taken ones
    (``overlap="fill"``) or keeps only its free ones (``"free_only"``); ``last``: see :func:`last_group_quota`.
    Returns boolean masks ``(N, *shape)``, disjoint while n·N ≤ m (always with ``"free_only"``)."""
    order = list(range(tau.shape[0])) if order is None else order
    masks = torch.zeros_like(tau, dtype=torch.bool)
    taken = torch.zeros_like(tau[0], dtype=torch.bool)
    for k, i in enumerate(order):
        keep = nm_mask(tau[i], n, m, None if k == 0 else ~taken, fill=overlap == "fill", last=last)
        masks[i] = keep
        taken |= keep & (tau[i] != 0)
    return masks


def tall_masks(tau: Tensor, merged: Tensor, lambdas: list[float]) -> Tensor:
    """TALL task masks ``mᵢ = 1[|τᵢ| > λᵢ |τ_MTL − τᵢ|]`` (strict) for stacked ``tau (N, *shape)`` and the merged
    task vector ``merged``; returns ``(N, *shape)`` booleans."""
    lam = torch.tensor(lambdas, dtype=tau.dtype).view(-1, *([1] * merged.dim()))
    return tau.abs() > lam * (merged.unsqueeze(0) - tau).abs()


#: the block (layer) number of a tensor: the first integer component of its name (``layers.3.mlp.weight`` → 3)
BLOCK_PATTERN = r"(?:^|\.)(\d+)(?:\.|$)"


def block_index(name: str, pattern: str = BLOCK_PATTERN) -> int | None:
    """The block (layer) index of a parameter name: the first match of ``pattern``'s group, or None."""
    import re

    found = re.search(pattern, name)
    return int(found.group(1)) if found else None
