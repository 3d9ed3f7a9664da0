"""Coefficients chosen from the captured Fisher (lightning_merge.tools.coefficients): the closed form against a direct
evaluation of the quadratic model, known answers, blocks, errors."""

from __future__ import annotations

import pytest
import torch

from lightning_merge import Expert, merge
from lightning_merge.tools.coefficients import quadratic_coefficients

SHAPES = {"layers.0.weight": (6, 5), "layers.0.bias": (6,), "layers.1.weight": (4, 6), "head.weight": (3, 4)}


def _expert(base, taus, fisher, name):
    state = {k: base[k] + taus[k] for k in base}
    return Expert(state, statistics={"fisher.example": fisher}, name=name)


def _random_family(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts, taus, fishers = [], [], []
    for i in range(n):
        tau = {k: 0.3 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        fisher = {k: torch.rand(s, generator=g) * (i + 1) + 0.01 for k, s in SHAPES.items()}
        experts.append(_expert(base, tau, fisher, f"e{i}"))
        taus.append(tau)
        fishers.append(fisher)
    return Expert(base, name="base"), experts, taus, fishers


def _direct(taus, fishers, lam, names=None):
    """rᵢ(λ) by forming the merged task vector: (τ(λ) − τᵢ)ᵀ Fᵢ (τ(λ) − τᵢ) / τᵢᵀ Fᵢ τᵢ (as the expert reads it)."""
    names = names or list(SHAPES)
    out = []
    for tau_i, f_i in zip(taus, fishers):
        num = den = 0.0
        for k in names:
            merged = sum(w * t[k].double() for w, t in zip(lam, taus))
            num += float(((merged - tau_i[k].double()) ** 2 * f_i[k].double()).sum())
            den += float((tau_i[k].double() ** 2 * f_i[k].double()).sum())
        out.append(num / den)
    return out


def test_the_prediction_equals_the_quadratic_evaluated_directly_and_the_choice_minimises_it():
    base, experts, _, _ = _random_family()
    choice = quadratic_coefficients(experts, base, ridge=0.0)
    fishers = [{k: e.statistic(k, "fisher") for k in SHAPES} for e in experts]  # merge-ready, as used
    taus = [{k: e.tensor(k) - base.tensor(k) for k in SHAPES} for e in experts]  # τ as the merge reads it
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        lam = (torch.rand(3, generator=g) * 2).tolist()
        assert choice.predict(lam) == pytest.approx(_direct(taus, fishers, lam), rel=1e-9)
    assert choice.predict([0, 0, 0]) == pytest.approx([1.0, 1.0, 1.0])  # the base: each task's full gap
    best = choice.predicted_mean(choice.weights)
    for _ in range(20):
        nudged = [w + float(d) for w, d in zip(choice.weights, torch.randn(3, generator=g) * 0.05)]
        assert choice.predicted_mean(nudged) > best
    # and the closed form solves G λ = b
    lam = torch.tensor(choice.weights, dtype=torch.float64)
    torch.testing.assert_close(choice.gram @ lam, choice.target, rtol=1e-9, atol=1e-12)


def test_known_answers():
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    # disjoint supports, each Fisher only on its own expert's support: no interference, every λ = 1
    mask0 = {k: (torch.arange(v.numel()) % 2 == 0).reshape(v.shape).float() for k, v in base.items()}
    mask1 = {k: 1 - m for k, m in mask0.items()}
    taus = [{k: torch.randn(v.shape, generator=g) * m[k] for k, v in base.items()} for m in (mask0, mask1)]
    fishers = [{k: m[k] + 1e-12 for k in base} for m in (mask0, mask1)]
    experts = [_expert(base, t, f, f"e{i}") for i, (t, f) in enumerate(zip(taus, fishers))]
    choice = quadratic_coefficients(experts, Expert(base), ridge=0.0)
    assert choice.weights == pytest.approx([1.0, 1.0], abs=1e-6)
    # the same task vector twice, one Fisher: the two coefficients share one task's worth (λ₁ + λ₂ = 1)
    tau = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()}
    twins = quadratic_coefficients([_expert(base, tau, fisher, "a"), _expert(base, tau, fisher, "b")], Expert(base))
    assert sum(twins.weights) == pytest.approx(1.0, abs=1e-5) and twins.weights[0] == pytest.approx(0.5, abs=1e-5)


def test_blocks_solve_the_quadratic_restricted_to_their_tensors_with_model_wide_normalisers():
    base, experts, _, _ = _random_family(seed=2)
    choice = quadratic_coefficients(experts, base, per_block=True, ridge=0.0)
    taus = [{k: e.tensor(k) - base.tensor(k) for k in SHAPES} for e in experts]
    assert set(choice.per_block) == {"block 0", "block 1"}
    fishers = [{k: e.statistic(k, "fisher") for k in SHAPES} for e in experts]
    names = ["layers.1.weight"]
    lam = choice.per_block["block 1"]
    c = [sum(float((t[k].double() ** 2 * f[k].double()).sum()) for k in SHAPES) for t, f in zip(taus, fishers)]

    def block_objective(x):
        total = 0.0
        for tau_i, f_i, c_i in zip(taus, fishers, c):
            merged = sum(w * t[names[0]].double() for w, t in zip(x, taus))
            total += float(((merged - tau_i[names[0]].double()) ** 2 * f_i[names[0]].double()).sum()) / c_i
        return total

    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        nudged = [w + float(d) for w, d in zip(lam, torch.randn(3, generator=g) * 0.05)]
        assert block_objective(nudged) > block_objective(lam)


def test_the_strategy_merges_with_the_chosen_coefficients():
    base, experts, taus, _ = _random_family(seed=4)
    choice = quadratic_coefficients(experts, base)
    merged = merge(experts, base, choice.strategy())
    for k in SHAPES:
        want = base.tensor(k) + sum(w * t[k] for w, t in zip(choice.weights, taus))
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)


def test_errors_name_what_is_wrong():
    base, experts, _, _ = _random_family()
    with pytest.raises(ValueError, match="needs base="):
        quadratic_coefficients(experts, None)
    with pytest.raises(ValueError, match="at least 2 experts"):
        quadratic_coefficients(experts[:1], base)
    plain = Expert({k: experts[0].tensor(k) for k in SHAPES}, name="no-stats")
    with pytest.raises(Exception, match="no-stats"):
        quadratic_coefficients([plain, experts[1]], base)
    with pytest.raises(ValueError, match="predict|weights"):
        quadratic_coefficients(experts, base).predict([1.0])


def test_per_block_coefficients_merge_through_the_layerwise_strategy():
    from lightning_merge import LayerwiseTaskArithmetic

    base, experts, _, _ = _random_family(seed=6)
    choice = quadratic_coefficients(experts, base, per_block=True)
    strategy = choice.strategy(per_block=True)
    assert isinstance(strategy, LayerwiseTaskArithmetic)
    merged = merge(experts, base, strategy)
    for k in SHAPES:
        block = {"layers.0.weight": "block 0", "layers.0.bias": "block 0", "layers.1.weight": "block 1"}.get(k)
        lam = choice.per_block[block] if block else choice.weights  # "head.weight" has no block: the model-wide λ*
        want = base.tensor(k) + sum(w * (e.tensor(k) - base.tensor(k)) for w, e in zip(lam, experts))
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per_block=True"):
        quadratic_coefficients(experts, base).strategy(per_block=True)


def test_layerwise_arguments_are_checked():
    from lightning_merge import LayerwiseTaskArithmetic, Strategy

    for bad in ("", -1, 1.5, True):
        with pytest.raises(ValueError, match="is not a non-negative integer or a non-empty name"):
            LayerwiseTaskArithmetic(coefficients={bad: [1.0]})
    named = LayerwiseTaskArithmetic(coefficients={"head.weight": [2.0], "03": [0.5]}, pattern=r"^(.*)$")
    assert named.coefficients == {"head.weight": [2.0], "3": [0.5]}
    assert named.coefficients_of("head.weight", 1) == [2.0] and named.coefficients_of("body.weight", 1) == [1.0]
    with pytest.raises(ValueError, match="different numbers of experts"):
        LayerwiseTaskArithmetic(coefficients={"0": [1.0], "1": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not a finite number"):
        LayerwiseTaskArithmetic(coefficients={"0": [float("nan")]})
    s = LayerwiseTaskArithmetic(coefficients={0: [0.5, 0.25]}, default=[1.0, 0.5], scale=2.0)
    assert Strategy.from_dict(s.to_dict()) == s and s.coefficients == {"0": [0.5, 0.25]}
    form = s.linear_form(2, "layers.0.weight")
    assert form.experts == (1.0, 0.5) and form.base == pytest.approx(-0.5)
    assert s.linear_form(2, "head.weight").experts == (2.0, 1.0)
    # without a tensor name (the adapter output's up-front check asks so): the form outside the listed blocks
    assert s.linear_form(2).experts == (2.0, 1.0) and s.linear_form(2).preserves_base
    base, experts, _, _ = _random_family(n=3)
    with pytest.raises(ValueError, match="lists 2 coefficients for 3 experts"):
        merge(experts, base, LayerwiseTaskArithmetic(coefficients={"0": [1.0, 1.0]}))
