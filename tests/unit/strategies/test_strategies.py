"""Formulas and sanity properties of the linear-family strategies (ALGORITHMS.md), on values."""

import pytest
import torch

from lightning_merge import Breadcrumbs, Dare, Linear, Strategy, TaskArithmetic, Ties, merge
from lightning_merge.strategies import STRATEGIES
from lightning_merge.strategies import functional as F


def stack(n=3, shape=(6, 7), seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    taus = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    if positive:
        taus = [t.abs() + 0.01 for t in taus]
    return base, [base + t for t in taus], taus


def run(strategy, base, tensors, name="w"):
    return strategy.merge_tensor(name, base, tensors, [{} for _ in tensors])


# -- functional pieces --------------------------------------------------------------------------------------------


def test_keep_count_rule():
    assert F.keep_count(0.2, 10) == 2
    assert F.keep_count(0.01, 10) == 1  # at least one
    assert F.keep_count(0.0, 10) == 0 and F.keep_count(-1, 10) == 0
    assert F.keep_count(1.0, 10) == 10


def test_topk_mask_breaks_ties_by_lower_flat_index():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert F.topk_mask(x, 1).tolist() == [False, True, False, False, False, False]
    assert F.topk_mask(x, 3).tolist() == [False, True, True, True, False, False]
    assert F.topk_mask(x, 4).tolist() == [False, True, True, True, True, False]


def test_topk_mask_equals_a_stable_sort_on_many_ties():
    """The selection path (radix select, then ties dropped from the highest index) against a stable descending
    sort of (value, index), on inputs with heavy ties (values drawn from a few levels) and every k."""
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        n = int(torch.randint(1, 300, (1,), generator=g))
        x = torch.randint(0, 1 + trial % 6, (n,), generator=g).float() * 0.25
        order = sorted(range(n), key=lambda i: (-float(x[i]), i))
        for k in {0, 1, n // 3, n // 2, n - 1, n}:
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(F.topk_mask(x, k), expected), (trial, k)


def test_kth_largest_radix_select_equals_kthvalue():
    """The two-pass radix select on float32 bit patterns against torch.kthvalue: magnitudes over many exponents,
    subnormals, exact zeros and repeated values."""
    g = torch.Generator().manual_seed(5)
    inputs = [
        torch.randn(10_000, generator=g).abs(),
        (torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-40, 30, (10_000,), generator=g)).abs(),
        torch.cat([torch.zeros(500), torch.full((300,), 1e-42), torch.rand(700, generator=g)]),
        torch.randint(0, 4, (5_000,), generator=g).float(),
    ]
    for x in inputs:
        for k in (1, 2, x.numel() // 5, x.numel() // 2, x.numel() - 1, x.numel()):
            expected = torch.kthvalue(x, x.numel() - k + 1).values
            assert F.kth_largest(x, k).item() == expected.item(), k


def test_magnitude_mask_keeps_largest_abs():
    tau = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0, 1.0, -2.0, 0.05, 3.0])
    mask = F.magnitude_mask(tau, 0.3)
    assert mask.tolist() == [False, True, False, True, False, False, False, False, False, True]


def test_breadcrumbs_mask_matches_mergekit_rule():
    # |tau| = 1..100 in shuffled order; density .5, gamma .1: keep sorted positions [40, 90) → magnitudes 41..90
    g = torch.Generator().manual_seed(1)
    values = torch.arange(1, 101, dtype=torch.float64)
    tau = values[torch.randperm(100, generator=g)] * torch.where(torch.rand(100, generator=g) < 0.5, -1.0, 1.0)
    mask = F.breadcrumbs_mask(tau, 0.5, 0.1)
    kept = sorted(tau[mask].abs().tolist())
    assert kept == list(map(float, range(41, 91)))


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.01), (0.3, 0.0), (0.0, 0.2), (0.95, 0.5)])
def test_breadcrumbs_mask_equals_the_stable_sort_rule_with_ties(density, gamma):
    g = torch.Generator().manual_seed(3)
    tau = torch.randint(-6, 7, (17, 23), generator=g).float() / 4  # many ties, zeros included
    n = tau.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[n_bot : n_bot + target]] = True
    assert torch.equal(F.breadcrumbs_mask(tau, density, gamma), expected.view_as(tau))


def test_breadcrumbs_mask_when_gamma_and_density_exceed_one():
    tau = torch.arange(1.0, 11.0)
    mask = F.breadcrumbs_mask(tau, 0.95, 0.5)  # n_bot = max(0, 10 - 9 - 5) = 0 → smallest 9 kept
    assert mask.tolist() == [True] * 9 + [False]


# -- Linear and task arithmetic -----------------------------------------------------------------------------------


def test_linear_weighted_average_formula():
    _, tensors, _ = stack()
    w = [0.5, 1.0, 2.5]
    got = run(Linear(weights=w), None, tensors)
    expected = sum(wi * t for wi, t in zip(w, tensors)) / sum(w)
    torch.testing.assert_close(got, expected)
    got = run(Linear(weights=w, normalize=False), None, tensors)
    torch.testing.assert_close(got, sum(wi * t for wi, t in zip(w, tensors)))


def test_linear_one_expert_is_identity():
    _, tensors, _ = stack(n=1)
    assert torch.equal(run(Linear(), None, tensors), tensors[0])


def test_task_arithmetic_formula_and_sanity():
    base, tensors, taus = stack()
    torch.testing.assert_close(run(TaskArithmetic(scale=0.0), base, tensors), base)
    torch.testing.assert_close(run(TaskArithmetic(scale=1 / 3), base, tensors), sum(tensors) / 3)
    w = [1.0, -0.5, 2.0]
    got = run(TaskArithmetic(weights=w, scale=0.7), base, tensors)
    torch.testing.assert_close(got, base + 0.7 * sum(wi * t for wi, t in zip(w, taus)))


# -- TIES ---------------------------------------------------------------------------------------------------------


def ties_reference(base, taus, weights, density, weighted=True):
    """Entry-by-entry reference of ALGORITHMS.md's TIES (plain Python loops)."""
    trimmed = []
    for t in taus:
        flat = t.reshape(-1).tolist()
        k = F.keep_count(density, len(flat)) if density < 1 else len(flat)
        order = sorted(range(len(flat)), key=lambda j: (-abs(flat[j]), j))[:k]
        keep = set(order)
        trimmed.append([v if j in keep else 0.0 for j, v in enumerate(flat)])
    out = []
    for j in range(len(trimmed[0])):
        vals = [tr[j] for tr in trimmed]
        elect_on = [w * v for w, v in zip(weights, vals)] if weighted else vals
        gamma = 1.0 if sum(elect_on) >= 0 else -1.0
        num, den = 0.0, 0.0
        for w, v, e in zip(weights, vals, elect_on):
            s = (e > 0) - (e < 0)
            if s == gamma:
                num += w * v
                den += w if weighted else 1.0
        out.append(num / (den if den != 0 else 1.0))
    return base + torch.tensor(out, dtype=base.dtype).reshape(base.shape)


@pytest.mark.parametrize("election", ["weighted", "unweighted"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(election, density):
    base, tensors, taus = stack(seed=3)
    w = [1.0, 0.4, 1.7]
    got = run(Ties(density=density, weights=w, election=election), base, tensors)
    expected = ties_reference(base, taus, w, density, weighted=election == "weighted")
    torch.testing.assert_close(got, expected)


def test_ties_full_density_no_conflict_is_mean_of_task_vectors():
    base, tensors, taus = stack(positive=True)
    got = run(Ties(density=1.0), base, tensors)
    torch.testing.assert_close(got, base + sum(taus) / 3)


def test_ties_trim_keeps_k_per_expert():
    base, tensors, taus = stack(n=1, shape=(10, 10))
    got = run(Ties(density=0.13), base, tensors)
    assert int(((got - base) != 0).sum()) == 13


def test_ties_unweighted_matches_peft():
    from peft.utils.merge_utils import ties as peft_ties

    base, tensors, taus = stack(seed=5, shape=(20, 30))
    taus32 = [t.float() for t in taus]
    w = torch.tensor([1.0, 0.5, 2.0])
    expected = peft_ties(taus32, w, density=0.3, majority_sign_method="total")
    strategy = Ties(density=0.3, weights=w.tolist(), election="unweighted")
    got = run(strategy, base.float(), [base.float() + t for t in taus32])
    torch.testing.assert_close(got - base.float(), expected, atol=1e-6, rtol=1e-5)


def test_ties_model_wide_topk_equals_brute_force():
    base, experts = _model(seed=2)
    merged = merge(experts, base, Ties(density=0.1, topk="model"))
    names = list(base)
    for _i, expert in enumerate(experts):
        flat = torch.cat([(expert[n] - base[n]).reshape(-1) for n in names])
        keep = F.topk_mask(flat.abs(), F.keep_count(0.1, flat.numel()))
        # single expert merged through TIES = its trimmed task vector
        single = merge([expert], base, Ties(density=0.1, topk="model"))
        got = torch.cat([(single[n] - base[n]).reshape(-1) for n in names])
        torch.testing.assert_close(got, flat * keep)
        assert int((got != 0).sum()) == keep.sum()
    # model-wide differs from per-tensor in general
    per_tensor = merge(experts, base, Ties(density=0.1))
    assert any(not torch.equal(merged[n], per_tensor[n]) for n in names)


def test_ties_model_wide_ties_at_threshold_in_tensor_order():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    expert = {"a": torch.tensor([1.0, 2.0, 2.0, 0.5]), "b": torch.tensor([2.0, 3.0, 2.0, 0.1])}
    # k = 3 of 8: 3.0, then the first two 2.0 in tensor order (a[1], a[2])
    got = merge([expert], base, Ties(density=3 / 8, topk="model"))
    assert got["a"].tolist() == [0.0, 2.0, 2.0, 0.0]
    assert got["b"].tolist() == [0.0, 3.0, 0.0, 0.0]


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "a": torch.randn(12, 9, generator=g),
        "b": torch.randn(30, generator=g),
        "c": torch.randn(5, 5, generator=g),
    }
    experts = [{k: v + torch.randn(v.shape, generator=g) * (1 + i) for k, v in base.items()} for i in range(3)]
    return base, experts


# -- DARE ---------------------------------------------------------------------------------------------------------


def test_dare_zero_drop_is_task_arithmetic():
    base, tensors, _ = stack()
    torch.testing.assert_close(
        run(Dare(drop_rate=0.0, scale=0.6), base, tensors), run(TaskArithmetic(scale=0.6), base, tensors)
    )
    torch.testing.assert_close(
        run(Dare(drop_rate=0.0, combine="ties"), base, tensors), run(Ties(density=1.0), base, tensors)
    )


def test_dare_kept_entries_rescaled_by_inverse_keep_prob():
    base, tensors, taus = stack(n=1, shape=(200, 50))
    got = run(Dare(drop_rate=0.75), base, tensors) - base
    kept = got != 0
    torch.testing.assert_close(got[kept], taus[0][kept] / 0.25)
    assert abs(kept.double().mean().item() - 0.25) < 0.01


def test_dare_unbiased_in_expectation():
    base, tensors, taus = stack(n=1, shape=(40, 40))
    mean = sum(run(Dare(drop_rate=0.5, seed=s), base, tensors) - base for s in range(400)) / 400
    assert (mean - taus[0]).abs().mean() < 0.06 * taus[0].abs().mean()


def test_dare_l1_rescale_matches_norm():
    base, tensors, taus = stack(n=1, shape=(30, 30))
    got = run(Dare(drop_rate=0.6, rescale="l1"), base, tensors) - base
    torch.testing.assert_close(got.abs().sum(), taus[0].abs().sum())


def test_dare_seeded_per_tensor_and_expert():
    base, tensors, _ = stack()
    a = run(Dare(drop_rate=0.5, seed=1), base, tensors, name="x")
    assert torch.equal(a, run(Dare(drop_rate=0.5, seed=1), base, tensors, name="x"))
    assert not torch.equal(a, run(Dare(drop_rate=0.5, seed=2), base, tensors, name="x"))
    assert not torch.equal(a, run(Dare(drop_rate=0.5, seed=1), base, tensors, name="y"))


def test_dare_result_independent_of_threads():
    base, experts = _model()
    one = merge(experts, base, Dare(drop_rate=0.5, combine="ties"), threads=1)
    two = merge(experts, base, Dare(drop_rate=0.5, combine="ties"), threads=2)
    for k in one:
        assert torch.equal(one[k], two[k])


# -- Breadcrumbs --------------------------------------------------------------------------------------------------


def test_breadcrumbs_is_task_arithmetic_of_masked_vectors():
    base, tensors, taus = stack(shape=(10, 10))
    got = run(Breadcrumbs(density=0.6, gamma=0.1, scale=0.8), base, tensors)
    expected = base + 0.8 * sum(t * F.breadcrumbs_mask(t, 0.6, 0.1) for t in taus)
    torch.testing.assert_close(got, expected)


def test_breadcrumbs_ties_elects_signs():
    base, tensors, taus = stack(shape=(10, 10))
    got = run(Breadcrumbs(density=0.6, gamma=0.1, election="weighted", normalize=True), base, tensors)
    masked = [t * F.breadcrumbs_mask(t, 0.6, 0.1) for t in taus]
    expected = base + F.combine_task_vectors(torch.stack(masked), torch.ones(3), election="weighted", normalize=True)
    torch.testing.assert_close(got, expected)


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_to_dict_round_trip(name):
    strategy = STRATEGIES[name]()
    rebuilt = Strategy.from_dict(strategy.to_dict())
    assert rebuilt == strategy and rebuilt.to_dict() == strategy.to_dict()


def test_from_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        Strategy.from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="no argument 'densty'.*density"):
        Strategy.from_dict({"name": "ties", "densty": 0.3})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Ties(density=1.5), r"Ties.density must be in \[0.0, 1.0\]"),
        (lambda: Dare(drop_rate=-0.1), r"Dare.drop_rate"),
        (lambda: Ties(election="majority"), r"Ties.election must be one of"),
        (lambda: Dare(combine="sum"), r"Dare.combine"),
        (lambda: Linear(weights="a"), r"Linear.weights must be a number"),
        (lambda: Ties(topk="layer"), r"Ties.topk"),
    ],
)
def test_invalid_arguments_rejected_in_init(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_per_expert_list_length_checked():
    base, experts = _model()
    with pytest.raises(ValueError, match="weights has 2 values but 3 experts"):
        merge(experts, base, TaskArithmetic(weights=[1.0, 2.0]))
