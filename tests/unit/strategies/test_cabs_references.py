"""CABS against its two references, rule by rule (issue 33, audit item 4).

Each reference's rule is re-implemented here from its code, in plain per-group loops (the references themselves
need mergekit's plugin system or a 7B checkpoint): the mergekit CABS plugin (``mergekit/merge_methods/cabs.py``),
the official RoBERTa script (``src/roberta_glue_experiments/prune_task_vector.py``) and the official 7B script
(``src/mistral_leaderboard_experiments/prune_task_vector_7b.py``) of github.com/zongzhenyang/CABS. The inputs
have no zero and no tied magnitude, so the references' tie-breaking and their "a kept zero takes a position"
(where this project differs on purpose) do not matter.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_merge import Cabs, Generalized, merge
from lightning_merge.strategies import functional as F


def _experts(shape, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + torch.randn(*shape, generator=g) for _ in range(count)]


def _top(values: list[float], candidates: list[int], k: int) -> list[int]:
    return sorted(candidates, key=lambda j: -abs(values[j]))[:k]


def _plugin_merge(base, finetuned, weights, n, m, order):
    """The mergekit plugin: each expert in order prunes τ ⊙ (not yet retained) to n per group of the tensor padded
    with zeros to a multiple of m (pads and zeroed entries can be "kept", adding nothing); retained positions
    accumulate; θ = θ₀ + Σ wₖ τₖ'."""
    numel = base.numel()
    padded = math.ceil(numel / m) * m
    retained = [False] * padded
    out = base.reshape(-1).clone()
    for k in order:
        tau = (finetuned[k] - base).reshape(-1).tolist() + [0.0] * (padded - numel)
        candidate = [0.0 if retained[j] else tau[j] for j in range(padded)]
        for start in range(0, padded, m):
            for j in _top(candidate, list(range(start, start + m)), n):
                retained[j] = True
                if j < numel:
                    out[j] += weights[k] * candidate[j]
    return out.view_as(base)


def _roberta_script_merge(base, finetuned, n, m):
    """The official RoBERTa script (two experts): n:m per complete group, an incomplete last group skipped (kept
    by neither); the second expert is zeroed where the first kept, then pruned the same way."""
    taus = [(f - base).reshape(-1).tolist() for f in finetuned]
    numel = len(taus[0])
    kept = [[0.0] * numel, [0.0] * numel]
    mask1 = [False] * numel
    for start in range(0, numel - m + 1, m):
        for j in _top(taus[0], list(range(start, start + m)), n):
            mask1[j] = True
            kept[0][j] = taus[0][j]
    second = [0.0 if mask1[j] else taus[1][j] for j in range(numel)]
    for start in range(0, numel - m + 1, m):
        for j in _top(second, list(range(start, start + m)), n):
            kept[1][j] = second[j]
    return base + torch.tensor(kept[0]).view_as(base) + torch.tensor(kept[1]).view_as(base)


def _seven_b_script_masks(tau1, tau2, n, m):
    """The official 7B script (two experts, whole groups only): expert 1 keeps its n:m; expert 2 keeps, for
    n ≥ m/2, every position expert 1 left plus the top m/2 of expert 1's positions by |τ₂|, else its n:m among
    the positions expert 1 left."""
    a, b = tau1.reshape(-1).tolist(), tau2.reshape(-1).tolist()
    keep1, keep2 = [False] * len(a), [False] * len(a)
    for start in range(0, len(a), m):
        group = list(range(start, start + m))
        for j in _top(a, group, n):
            keep1[j] = True
        left = [j for j in group if not keep1[j]]
        if n >= m // 2:
            for j in left + _top(b, [j for j in group if keep1[j]], m // 2):
                keep2[j] = True
        else:
            for j in _top(b, left, n):
                keep2[j] = True
    return torch.tensor(keep1).view_as(tau1), torch.tensor(keep2).view_as(tau2)


@pytest.mark.parametrize("shape,n,m,count", [
    ((40,), 4, 16, 2),        # the audit's bias: a last group of 8 keeps min(4, 8) = 4, not ceil(4·8/16) = 2
    ((40,), 6, 16, 3),        # n·N > m: a later expert keeps only its free positions (the plugin adds zeros)
    ((5, 9), 3, 8, 3),        # 45 entries: a last group of 5
    ((3,), 2, 8, 2),          # a tensor smaller than m: one padded group keeps min(n, 3)
    ((4, 16), 12, 16, 2),     # whole groups, n > m/2
])
def test_pad_and_free_only_match_the_mergekit_plugin(shape, n, m, count):
    base, finetuned = _experts(shape, count, seed=n * 10 + count)
    weights = [1.2, 0.7, 1.0][:count]
    order = list(reversed(range(count)))
    want = _plugin_merge(base, finetuned, weights, n, m, order)
    got = merge([{"w": f} for f in finetuned], {"w": base},
                Cabs(n=n, m=m, order=order, weights=weights, last_group="pad", overlap="free_only"))["w"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    generalized = Generalized(sparsification="cabs", density=n / m, group_size=m, order=order, weights=weights,
                              last_group="pad", overlap="free_only")
    torch.testing.assert_close(merge([{"w": f} for f in finetuned], {"w": base}, generalized)["w"], want,
                               atol=1e-6, rtol=1e-6)


def test_the_audits_cases_differ_from_the_plugin_by_the_defaults_only():
    """The defaults (``density``, ``fill``) are not the plugin's rules: the audit's two cases, measured."""
    base, finetuned = _experts((40,), 2, seed=3)
    experts = [{"w": f} for f in finetuned]
    plugin = _plugin_merge(base, finetuned, [1.0, 1.0], 4, 16, [0, 1])
    default = merge(experts, {"w": base}, Cabs(n=4, m=16))["w"]
    assert float((default - plugin).abs().max()) > 0.1  # the last group of 8 keeps 2 instead of 4 per expert
    assert torch.equal(default[:32], plugin[:32])  # whole groups agree
    base, finetuned = _experts((48,), 3, seed=4)
    experts = [{"w": f} for f in finetuned]
    plugin = _plugin_merge(base, finetuned, [1.0] * 3, 6, 16, [0, 1, 2])
    default = merge(experts, {"w": base}, Cabs(n=6, m=16))["w"]
    free_only = merge(experts, {"w": base}, Cabs(n=6, m=16, overlap="free_only"))["w"]
    assert float((default - plugin).abs().max()) > 0.1  # the third expert completes its 6 from taken positions
    torch.testing.assert_close(free_only, plugin, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,n,m", [((40,), 4, 16), ((6, 20), 3, 32), ((64,), 12, 16), ((5,), 2, 8)])
def test_drop_and_free_only_match_the_official_roberta_script(shape, n, m):
    base, finetuned = _experts(shape, 2, seed=n + m)
    want = _roberta_script_merge(base, finetuned, n, m)
    got = merge([{"w": f} for f in finetuned], {"w": base},
                Cabs(n=n, m=m, last_group="drop", overlap="free_only"))["w"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fill_follows_the_official_7b_script_at_its_default_ratio():
    """At the 7B script's default n = 3m/4 (96:128) its m/2 from the overlap make n: ``fill`` equals it. At
    n = m/2 the script's second expert keeps its whole group (m − n free + m/2 overlapped); ``fill`` keeps n."""
    g = torch.Generator().manual_seed(7)
    tau = torch.randn(2, 4, 16, generator=g)
    masks = F.cabs_masks(tau, 12, 16)
    want1, want2 = _seven_b_script_masks(tau[0], tau[1], 12, 16)
    assert torch.equal(masks[0], want1) and torch.equal(masks[1], want2)
    masks = F.cabs_masks(tau, 8, 16)
    want1, want2 = _seven_b_script_masks(tau[0], tau[1], 8, 16)
    assert torch.equal(masks[0], want1)
    assert int(want2.sum()) == 64 and int(masks[1].sum()) == 4 * 8
    masks = F.cabs_masks(tau, 4, 16)  # n < m/2: every reference agrees
    want1, want2 = _seven_b_script_masks(tau[0], tau[1], 4, 16)
    assert torch.equal(masks[0], want1) and torch.equal(masks[1], want2)


@pytest.mark.parametrize("g,want", [(8, {"density": 2, "pad": 4, "drop": 0}), (3, {"density": 1, "pad": 3,
                                                                                    "drop": 0})])
def test_last_group_quota(g, want):
    for rule, count in want.items():
        assert F.last_group_quota(4, 16, g, rule) == count
        assert int(F.nm_mask(torch.arange(1.0, 16 + g + 1), 4, 16, last=rule)[16:].sum()) == count
    assert F.last_group_quota(4, 16, 16, "drop") == 4  # a whole group is never a "last group"
    assert bool(F.nm_mask(torch.ones(20), 16, 16, last="pad").all())
    assert not bool(F.nm_mask(torch.ones(20), 16, 16, last="drop")[16:].any())


def test_bad_rules_are_refused_by_name():
    with pytest.raises(ValueError, match="last_group"):
        Cabs(last_group="ceil")
    with pytest.raises(ValueError, match="overlap"):
        Cabs(overlap="zeros")
    with pytest.raises(ValueError, match="overlap"):
        Generalized(sparsification="cabs", density=0.25, overlap="zeros")
