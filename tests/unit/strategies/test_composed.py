"""CABS, Consensus / TALL masks, LiNeS and the generalized task-vector engine: the rules and sanity properties of
ALGORITHMS.md checked on values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import state_dicts

from lightning_merge import (
    OTA,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Expert,
    Fisher,
    Generalized,
    LiNeS,
    Strategy,
    TaskArithmetic,
    Ties,
    merge,
    prepare,
    tall,
)
from lightning_merge.strategies import functional as F

SHAPES = {"layers.0.w": (6, 20), "layers.1.w": (5, 13), "layers.2.w": (40,), "emb": (7,)}


def _setup(n=3, seed=0, shapes=None):
    return state_dicts(shapes or SHAPES, n, seed)


def _with_stats(experts, kind, seed=1, same=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, e in enumerate(experts):
        stats = {k: (torch.ones_like(v) * 0.3 if same else torch.rand(*v.shape, generator=g) + 0.05)
                 for k, v in e.items()}
        out.append(Expert(e, statistics={kind: stats}, name=f"e{i}"))
    return out


def _close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# -- CABS ------------------------------------------------------------------------------------------------------


def _reference_nm(tau, n, m, free, fill=False, last="density"):
    """A plain loop over groups: the rule as written, to compare the vectorised one against."""
    flat, ok = tau.reshape(-1).abs().tolist(), free.reshape(-1).tolist()
    keep = [False] * len(flat)
    for start in range(0, len(flat), m):
        idx = [j for j in range(start, min(start + m, len(flat))) if ok[j]]
        g = min(start + m, len(flat)) - start
        quota = n if g == m else {"density": math.ceil(n * g / m), "pad": min(n, g), "drop": 0}[last]
        idx.sort(key=lambda j: (-flat[j], j))
        for j in idx[:quota]:
            keep[j] = True
        if fill and len(idx) < quota:  # complete the quota with the largest of the positions not free
            rest = [j for j in range(start, min(start + m, len(flat))) if not ok[j]]
            rest.sort(key=lambda j: (-flat[j], j))
            for j in rest[: quota - len(idx)]:
                keep[j] = True
    return torch.tensor(keep).view_as(tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,numel", [(2, 8, 64), (3, 8, 61), (1, 4, 3), (5, 16, 100), (0, 4, 9), (4, 4, 10)])
@pytest.mark.parametrize("last", ["density", "pad", "drop"])
def test_nm_mask_matches_the_rule(n, m, numel, dtype, last):
    g = torch.Generator().manual_seed(n * 100 + numel)
    tau = torch.randn(numel, generator=g, dtype=dtype)
    tau[::7] = 0.5  # ties: the lower index wins
    free = torch.rand(numel, generator=g) > 0.3
    for f in (None, free, torch.rand(numel, generator=g) > 0.8):  # the last leaves many groups short of n
        for fill in (False, True):
            got = F.nm_mask(tau, n, m, f, fill=fill, last=last)
            want = _reference_nm(tau, n, m, torch.ones(numel, dtype=torch.bool) if f is None else f, fill, last)
            assert torch.equal(got, want)


def test_nm_mask_balanced_counts_and_incomplete_last_group():
    tau = torch.randn(10, 25)  # 250 entries: 7 full groups of 32 and a last group of 26
    mask = F.nm_mask(tau, 3, 32)
    groups = torch.nn.functional.pad(mask.reshape(-1), (0, 6)).view(-1, 32).sum(1)
    assert groups[:-1].tolist() == [3] * 7
    assert int(groups[-1]) == math.ceil(3 * 26 / 32) == 3
    assert int(F.nm_mask(torch.randn(5), 3, 32).sum()) == 1  # ceil(3·5/32)


def test_cabs_masks_are_disjoint_balanced_and_order_dependent():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 8, 32, generator=g)
    masks = F.cabs_masks(tau, 4, 16)
    assert int(masks.sum(0).max()) == 1  # disjoint
    per_group = masks.reshape(3, -1, 16).sum(-1)
    assert int(per_group.max()) <= 4
    assert torch.equal(masks[0], F.nm_mask(tau[0], 4, 16))  # the first expert chooses freely
    assert torch.equal(masks[1], F.nm_mask(tau[1], 4, 16, ~masks[0]))
    reversed_masks = F.cabs_masks(tau, 4, 16, order=[2, 1, 0])
    assert torch.equal(reversed_masks[2], F.nm_mask(tau[2], 4, 16))
    assert not torch.equal(reversed_masks, masks)


def test_cabs_group_with_too_few_free_positions_completes_n_from_the_largest_taken_ones():
    """The reference scripts' rule (density ≥ 1/N): the free positions, then the largest |τ| among those earlier
    experts took, up to n; the merge then adds both experts' values there."""
    tau = torch.ones(2, 4) + torch.arange(4.0)
    tau[1] = torch.tensor([1.0, 5.0, -2.0, 4.0])
    masks = F.cabs_masks(tau, 3, 4)  # expert 0 takes 3 of 4: expert 1 has 1 free position and takes 2 more
    assert masks[0].tolist() == [False, True, True, True]
    assert masks[1].tolist() == [True, True, False, True]
    base = {"w": torch.zeros(4)}
    experts = [{"w": tau[0]}, {"w": tau[1]}]
    got = merge(experts, base, Cabs(n=3, m=4))["w"]
    torch.testing.assert_close(got, tau[0] * masks[0] + tau[1] * masks[1])
    # at density ≤ 1/N every group has n free positions: the masks stay disjoint
    wide = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    assert int(F.cabs_masks(wide, 4, 16).sum(0).max()) == 1


def test_cabs_zero_entries_do_not_take_positions():
    tau = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    masks = F.cabs_masks(tau, 2, 4)
    assert masks[1].tolist() == [False, False, True, True]


def test_cabs_merge_is_base_plus_weighted_sum_of_disjoint_unscaled_parts():
    base, experts = _setup()
    strategy = Cabs(n=3, m=8, weights=[1.2, 0.7, 1.0], order=[1, 0, 2])
    out = merge(experts, base, strategy)
    for name in base:
        tau = torch.stack([e[name] - base[name] for e in experts])
        masks = F.cabs_masks(tau, 3, 8, [1, 0, 2])
        want = base[name] + (torch.tensor([1.2, 0.7, 1.0]).view(-1, *[1] * base[name].dim()) * tau * masks).sum(0)
        torch.testing.assert_close(out[name], want)
        # n·N = 9 > m: later experts complete short groups from taken positions, so the masks overlap
        assert bool((masks.sum(0) > 1).any())
    disjoint = Cabs(n=2, m=8, order=[1, 0, 2])  # n·N ≤ m and whole groups: orthogonal task vectors
    base, experts = _setup(shapes={"a": (4, 16), "b": (32,)})
    for name in base:
        tau = torch.stack([e[name] - base[name] for e in experts])
        parts = tau * F.cabs_masks(tau, 2, 8, [1, 0, 2])
        assert all(float((parts[i] * parts[j]).sum()) == 0.0 for i in range(3) for j in range(i))
        torch.testing.assert_close(merge(experts, base, disjoint)[name], base[name] + parts.sum(0))
    assert Cabs(n=64, m=256).density == 0.25
    base, experts = _setup()
    _close(merge(experts, base, Generalized(sparsification="cabs", density=3 / 8, group_size=8, order=[1, 0, 2],
                                            weights=[1.2, 0.7, 1.0])), out)


def test_cabs_bad_arguments():
    with pytest.raises(ValueError, match="n <= m"):
        Cabs(n=9, m=8)
    with pytest.raises(ValueError, match="election"):
        Cabs(election="weighted")
    with pytest.raises(ValueError, match="rescal"):
        Cabs(rescale="l1")
    base, experts = _setup()
    with pytest.raises(ValueError, match="order"):
        merge(experts, base, Cabs(n=2, m=8, order=[0, 0, 1]))


# -- Consensus / TALL ------------------------------------------------------------------------------------------


def test_consensus_masks_and_limits():
    base, experts = _setup(n=4)
    ta = merge(experts, base, TaskArithmetic())
    _close(merge(experts, base, Consensus(consensus_k=0)), ta)  # k = 0: plain τ_MTL
    _close(merge(experts, base, Consensus(consensus_k=5)), base)  # k > N: θ₀
    out = merge(experts, base, Consensus(consensus_k=2, tall_lambda=0.4, scale=0.5))
    for name in base:
        tau = torch.stack([e[name] - base[name] for e in experts])
        mtl = tau.sum(0)
        votes = sum((tau[i].abs() > 0.4 * (mtl - tau[i]).abs()).int() for i in range(4))
        torch.testing.assert_close(out[name], base[name] + 0.5 * mtl * (votes >= 2))


def test_consensus_over_ties():
    base, experts = _setup(n=3)
    ties = Ties(density=0.5)
    out = merge(experts, base, Consensus(sparsification="magnitude", density=0.5, election="weighted",
                                         normalize=True, consensus_k=1))
    ties_out = merge(experts, base, ties)
    for name in base:
        tau = torch.stack([e[name] - base[name] for e in experts])
        mtl = ties_out[name] - base[name]
        votes = F.tall_masks(tau, mtl, [0.6] * 3).sum(0)
        torch.testing.assert_close(out[name], base[name] + mtl * (votes >= 1))


def test_pack_bits_round_trip():
    for numel in (1, 7, 8, 9, 1000):
        mask = torch.rand(numel) > 0.5
        packed = tall.pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
        assert torch.equal(tall.unpack_bits(packed, [numel]), mask)


def test_tall_compression_recovers_masked_experts(tmp_path):
    base, experts = _setup(n=3)
    comp = tall.compress(experts, base, tmp_path / "tall", tall_lambda=[0.5, 0.6, 0.7])
    reopened = tall.TallCompressed(tmp_path / "tall")
    assert reopened.experts == ["<state dict>#0", "<state dict>#1", "<state dict>#2"]
    for i in range(3):
        rec = reopened.state_dict(i, base)
        for name in base:
            tau = torch.stack([e[name] - base[name] for e in experts])
            mtl = tau.sum(0)
            mask = tau[i].abs() > [0.5, 0.6, 0.7][i] * (mtl - tau[i]).abs()
            torch.testing.assert_close(rec[name], base[name] + mask * mtl)
    sizes = comp.storage()
    full = sum(v.numel() * 4 for v in base.values())
    assert sizes["task_vector"] < full + 1024
    assert sizes["masks"] < 3 * full / 32 + 2048
    with pytest.raises(FileExistsError):
        tall.compress(experts, base, tmp_path / "tall")


def test_tall_single_expert_is_lossless(tmp_path):
    base, experts = _setup(n=1)
    comp = tall.compress(experts, base, tmp_path / "one")
    _close(comp.state_dict(0, base), experts[0])
    assert all(d > 0.99 for d in comp.density().values())


# -- the generalized engine ------------------------------------------------------------------------------------


def test_generalized_reproduces_the_presets():
    base, experts = _setup()
    _close(merge(experts, base, Generalized(sparsification="magnitude", density=0.3, election="weighted",
                                            normalize=True)), merge(experts, base, Ties(density=0.3)))
    _close(merge(experts, base, Generalized(sparsification="random", density=0.4, seed=3)),
           merge(experts, base, Dare(drop_rate=0.6, seed=3)))
    _close(merge(experts, base, Generalized(sparsification="breadcrumbs", density=0.8, gamma=0.05)),
           merge(experts, base, Breadcrumbs(density=0.8, gamma=0.05)))
    _close(merge(experts, base, Generalized(scale=0.4)), merge(experts, base, TaskArithmetic(scale=0.4)))


def test_saliency_sparsification_with_election():
    base, experts = _setup()
    ex = _with_stats(experts, "exp_avg_sq")
    out = merge(ex, base, Generalized(sparsification="saliency", density=0.25, election="weighted", normalize=True))
    for name in base:
        tau = torch.stack([e[name] - base[name] for e in experts])
        kept = torch.stack([
            t * F.topk_mask(x.statistic(name, "exp_avg_sq") * t.square(), F.keep_count(0.25, t.numel()))
            for x, t in zip(ex, tau)
        ])
        want = F.combine_task_vectors(kept, torch.ones(3), election="weighted", normalize=True)
        torch.testing.assert_close(out[name], base[name] + want)


def test_curvature_weighting_composes():
    base, experts = _setup()
    ex = _with_stats(experts, "fisher")
    # no sparsification: exactly Fisher merging (floor, model-wide normalisation, scale)
    _close(merge(ex, base, TaskArithmetic(weighting="fisher", scale=1.3)), merge(ex, base, Fisher(scale=1.3)))
    same = _with_stats(experts, "fisher", same=True)
    # equal Fishers: the precision-weighted mean is the plain (disjoint) mean
    _close(merge(same, base, Ties(density=0.3, weighting="fisher")), merge(same, base, Ties(density=0.3)))
    _close(merge(same, base, Dare(drop_rate=0.5, weighting="fisher")),
           merge(same, base, Dare(drop_rate=0.5, normalize=True)))
    # OTA's weights
    ota = _with_stats(experts, "exp_avg_sq")
    _close(merge(ota, base, TaskArithmetic(weighting="ota")), merge(ota, base, OTA()), atol=1e-5)
    assert Dare(weighting="fisher").requires == ("fisher",)
    assert Generalized(sparsification="saliency", weighting="fisher").requires == ("fisher", "exp_avg_sq")


def test_dare_with_fisher_weights_by_hand():
    base, experts = _setup()
    ex = _with_stats(experts, "fisher")
    out = merge(ex, base, Dare(drop_rate=0.5, weighting="fisher", seed=1))
    norms = [math.sqrt(sum(float(x.statistic(k, "fisher").double().square().sum()) for k in base)) for x in ex]
    for name in base:
        num = den = 0
        for i, (x, e) in enumerate(zip(ex, experts)):
            tau = e[name] - base[name]
            kept = tau * F.random_mask(tau.shape, 0.5, F.tensor_seed(1, name, i)) / 0.5
            p = x.statistic(name, "fisher").clamp(min=1e-6) / norms[i]
            num, den = num + p * kept, den + p
        torch.testing.assert_close(out[name], base[name] + num / den)


def test_round_trips_and_errors():
    for s in (Cabs(n=3, m=32, order=[1, 0]), Consensus(tall_lambda=[0.2, 0.4]),
              Generalized(sparsification="saliency", density=0.1, weighting="ota", consensus_k=1),
              LiNeS(Ties(density=0.5), alpha=0.3, beta=0.7), Dare(weighting="fisher")):
        rebuilt = Strategy.from_dict(s.to_dict())
        assert rebuilt == s and rebuilt.to_dict() == s.to_dict()
    with pytest.raises(ValueError, match="sparsification"):
        Generalized(sparsification="topk")
    with pytest.raises(ValueError, match="weighting"):
        TaskArithmetic(weighting="adam")
    with pytest.raises(ValueError, match="pattern"):
        LiNeS(TaskArithmetic(), pattern="layers")
    with pytest.raises(ValueError, match="inner"):
        LiNeS("ties")


# -- LiNeS -----------------------------------------------------------------------------------------------------


def test_lines_layer_scaling_rule():
    base, experts = _setup()
    inner = Ties(density=0.5)
    inner_out = merge(experts, base, inner)
    strategy = LiNeS(Ties(density=0.5), alpha=0.2, beta=0.6)
    out = merge(experts, base, strategy)
    prepared = prepare(experts, base, strategy)
    factors = {"layers.0.w": 0.2, "layers.1.w": 0.2 + 0.6 * 1 / 2, "layers.2.w": 0.8, "emb": 0.2}
    for name, f in factors.items():
        assert prepared.layer_scale(name) == pytest.approx(f)
        torch.testing.assert_close(out[name], base[name] + f * (inner_out[name] - base[name]))


def test_lines_beta_zero_is_uniform_and_default_alpha_is_the_average_for_task_arithmetic():
    base, experts = _setup(n=4)
    _close(merge(experts, base, LiNeS(TaskArithmetic(), alpha=0.7, beta=0.0)),
           merge(experts, base, TaskArithmetic(scale=0.7)))
    strategy = LiNeS(TaskArithmetic(), beta=0.0)
    out = merge(experts, base, strategy)
    assert prepare(experts, base, strategy).alpha == pytest.approx(0.25)  # ‖Στ‖₁ / (N ‖Στ‖₁)
    _close(out, merge(experts, base, TaskArithmetic(scale=0.25)))
    # for another inner method, alpha·τ_merged has the L1 norm of the average task vector
    strategy = LiNeS(Ties(density=0.3), beta=0.0)
    out = merge(experts, base, strategy)
    merged_l1 = sum(float((out[k] - base[k]).abs().sum()) for k in base)
    mean_l1 = sum(float(torch.stack([e[k] - base[k] for e in experts]).mean(0).abs().sum()) for k in base)
    assert merged_l1 == pytest.approx(mean_l1, rel=1e-5)


def test_lines_single_task_keeps_the_deepest_block_whole_and_scales_the_shallowest_by_strength():
    """LiNeS.single_task(λ) on one expert: block l of L gets λ + (1 − λ)·l/(L − 1) of its task vector (α = λ,
    β = 1 − λ), the deepest block is the expert itself, and λ = 1 returns the expert."""
    base, experts = _setup(n=1)
    strategy = LiNeS.single_task(0.4)
    assert (strategy.alpha, strategy.beta) == (0.4, pytest.approx(0.6))
    out = merge(experts, base, strategy)
    for name, f in {"layers.0.w": 0.4, "layers.1.w": 0.7, "layers.2.w": 1.0, "emb": 0.4}.items():
        torch.testing.assert_close(out[name], base[name] + f * (experts[0][name] - base[name]))
    _close(merge(experts, base, LiNeS.single_task(1.0)), experts[0])
    with pytest.raises(ValueError, match="strength"):
        LiNeS.single_task(float("nan"))


def test_lines_block_pattern_is_configurable_and_one_block_gets_alpha():
    shapes = {"transformer.h.0.attn.w": (4, 4), "transformer.h.3.attn.w": (4, 4), "transformer.wte": (6,)}
    base, experts = _setup(shapes=shapes)
    strategy = LiNeS(TaskArithmetic(), alpha=0.5, beta=1.0, pattern=r"\.h\.(\d+)\.")
    prepared = prepare(experts, base, strategy)
    assert prepared.layer_scale("transformer.h.0.attn.w") == 0.5
    assert prepared.layer_scale("transformer.h.3.attn.w") == 1.5
    assert prepared.layer_scale("transformer.wte") == 0.5
    single = {"block.0.w": (3,), "head": (2,)}
    base, experts = _setup(shapes=single)
    strategy = LiNeS(TaskArithmetic(), alpha=0.5, beta=1.0)
    prepared = prepare(experts, base, strategy)
    assert prepared.layer_scale("block.0.w") == prepared.layer_scale("head") == 0.5


def test_consensus_tall_reference_builds_tau_mtl_as_the_tall_code_does():
    """Model-wide top-20 % trim per task vector, sign elected on the plain sum, disjoint sum (not mean); TALL masks
    from the untrimmed task vectors against τ_MTL; entries that k masks keep survive."""
    base, experts = _setup(n=4, seed=5)
    names = list(base)
    strategy = Consensus.tall_reference(consensus_k=2, tall_lambda=0.4, scale=0.7)
    got = merge(experts, base, strategy)
    taus = [{k: e[k] - base[k] for k in names} for e in experts]
    trimmed = []
    for tau in taus:  # the k-th largest |τ| over the whole model (continuous values: no ties)
        flat = torch.cat([tau[k].reshape(-1).abs() for k in names])
        keep = int(0.2 * flat.numel())
        threshold = torch.topk(flat, keep).values[-1]
        trimmed.append({k: torch.where(tau[k].abs() >= threshold, tau[k], 0.0) for k in names})
    for k in names:
        stack = torch.stack([t[k] for t in trimmed])
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        mtl = torch.where(torch.sign(stack) == sign, stack, 0.0).sum(0)  # the disjoint sum
        raw = torch.stack([t[k] for t in taus])
        votes = (raw.abs() > 0.4 * (mtl - raw).abs()).sum(0)
        want = base[k] + 0.7 * mtl * (votes >= 2)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    # the default over TIES trims per tensor and takes the mean: a different merge
    default = merge(experts, base, Consensus(sparsification="magnitude", density=0.2, election="weighted",
                                            normalize=True, tall_lambda=0.4, scale=0.7))
    assert any(not torch.allclose(default[k], got[k]) for k in names)
