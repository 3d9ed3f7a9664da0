"""mergekit's geometric methods (issue 31), checked against their formulas on tensors whose answer is known in
closed form (the parity with mergekit itself is in tests/integration/parity/test_parity_mergekit.py)."""

import math

import pytest
import torch

from lightning_merge import ArceeFusion, Karcher, ModelStock, MultiSlerp, NearSwap, NuSlerp, Slerp, merge
from lightning_merge.errors import NoContinualForm
from lightning_merge.strategies import Prepared
from lightning_merge.strategies.anchored import fusion_threshold


def _merge(strategy, base, tensors, name="w"):
    return Prepared(strategy, len(tensors)).merge_tensor(name, base, tensors, [{}] * len(tensors))


def test_slerp_follows_the_arc_between_orthogonal_tensors_and_is_linear_when_parallel():
    base, expert = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    for t in (0.0, 0.25, 0.5, 1.0):
        got = _merge(Slerp(t=t), base, [expert])
        angle = t * math.pi / 2  # θ = sin((1-t)Ω)/sinΩ θ₀ + sin(tΩ)/sinΩ θ₁ with Ω = π/2
        torch.testing.assert_close(got, torch.tensor([[math.cos(angle), 2 * math.sin(angle)]]))
    parallel = base * 3.0  # |cos| > 0.9995: linear interpolation
    torch.testing.assert_close(_merge(Slerp(t=0.3), base, [parallel]), 0.7 * base + 0.3 * parallel)


def test_nuslerp_interpolates_task_vectors_at_w2_over_w1_plus_w2_per_tensor_row_or_column():
    base = torch.tensor([[5.0, 5.0], [5.0, 5.0]])
    tau1, tau2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    t = 3.0 / 4.0  # weights 1 and 3
    want = base + math.sin((1 - t) * math.pi / 2) * tau1 + math.sin(t * math.pi / 2) * tau2  # orthogonal: Ω = π/2
    for flatten, row_wise in ((True, False), (False, False)):
        got = _merge(NuSlerp(weights=[1.0, 3.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise), base,
                     [base + tau1, base + tau2])
        torch.testing.assert_close(got, want)
    # row_wise: the vectors along the first axis (columns): column 0 of τ₁ is (1, 1), of τ₂ (0, 0) -> cos = 0 there
    columns = _merge(NuSlerp(weights=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True), base,
                     [base + tau1, base + tau2])
    torch.testing.assert_close(columns, want)
    assert NuSlerp(weights=[1.0, -1.0]).interpolation_factor() == 0.5  # weights summing to 0: the midpoint
    without_base = _merge(NuSlerp(weights=[1.0, 1.0]), None, [tau1, tau2])
    torch.testing.assert_close(without_base, (tau1 + tau2) * math.sin(math.pi / 4))


def test_multislerp_is_the_weighted_mean_direction_at_the_weighted_mean_length():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=g)
    taus = [torch.randn(4, 3, generator=g) * s for s in (1.0, 2.0, 0.5)]
    weights = [1.0, 0.6, 1.4]
    got = _merge(MultiSlerp(weights=weights), base, [base + t for t in taus]) - base
    w = [x / sum(weights) for x in weights]
    direction = sum(wi * t / t.norm() for wi, t in zip(w, taus))
    want = direction / direction.norm() * sum(wi * t.norm() for wi, t in zip(w, taus))
    torch.testing.assert_close(got, want)
    assert torch.equal(_merge(MultiSlerp(weights=[0.3]), base, [base + taus[0]]), base + taus[0])  # one: itself


def test_multislerp_cancelling_experts_two_linear_three_refused_all_zero_the_base():
    base, tau = torch.zeros(5), torch.arange(1.0, 6.0)
    torch.testing.assert_close(_merge(MultiSlerp(), base, [base + tau, base - tau]), base)  # linear: ½τ − ½τ
    with pytest.raises(ValueError, match=r"MultiSlerp: the weighted mean direction of tensor 'w' is 0"):
        _merge(MultiSlerp(weights=[1.0, 1.0, 2.0]), base, [base + tau, base + tau, base - tau])
    assert torch.equal(_merge(MultiSlerp(), base, [base, base, base]), base)


def test_karcher_mean_of_two_is_the_arc_midpoint_and_of_many_has_zero_gradient():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    got = _merge(Karcher(), None, [a, b])
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0]) / math.sqrt(2) * 3.0, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, generator=g).abs() + 0.1 for _ in range(4)]
    m = _merge(Karcher(max_iter=100, tol=1e-9), None, xs)
    assert math.isclose(float(m.norm()), sum(float(x.norm()) for x in xs) / 4, rel_tol=1e-5)
    m = m / m.norm()
    gradient = sum(math.acos(max(-1.0, min(1.0, float(m @ (x / x.norm()))))) /
                   math.sin(math.acos(float(m @ (x / x.norm())))) * (x / x.norm() - (m @ (x / x.norm())) * m)
                   for x in xs)
    assert float(gradient.norm()) < 1e-5
    assert torch.equal(_merge(Karcher(), None, [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_model_stock_ratio_from_the_pairwise_cosine():
    base = torch.ones(2)
    tau1, tau2 = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])  # cos = 0.6
    t = 2 * 0.6 / (1 + 0.6)
    got = _merge(ModelStock(), base, [base + tau1, base + tau2])
    torch.testing.assert_close(got, base + t * (tau1 + tau2) / 2)
    opposite = _merge(ModelStock(), base, [base + tau1, base - tau1])  # 1 + (N−1)cos = 0: the base
    assert torch.equal(opposite, base)
    rows = torch.stack([tau1, tau1]), torch.stack([tau2, -tau1])  # row 0: cos 0.6, row 1: cos 1
    filter_wise = _merge(ModelStock(filter_wise=True), torch.zeros(2, 2), list(rows))
    torch.testing.assert_close(filter_wise[0], t * (tau1 + tau2) / 2)
    torch.testing.assert_close(filter_wise[1], torch.zeros(2))  # row 1: cos = −1, singular: the base


def test_nearswap_takes_the_expert_within_t_and_moves_t_toward_it_elsewhere():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expert = torch.tensor([0.05, -0.5, 2.0, 1.0])
    got = _merge(NearSwap(t=0.1), base, [expert])
    torch.testing.assert_close(got, torch.tensor([0.05, -0.1, 0.1, 1.0]))  # |d| <= t: θ₁; else θ₀ + t·sign(d)


def test_arcee_fusion_keeps_the_changes_above_median_plus_one_and_a_half_iqr():
    importance = torch.arange(1.0, 10.0)  # n = 9: Q₁ = 3 (index 2), median 5 (4), Q₃ = 7 (6): 5 + 1.5·4 = 11
    assert float(fusion_threshold(importance)) == 11.0
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, generator=g)
    expert = base + 0.1 * torch.randn(6, 16, generator=g)
    got = _merge(ArceeFusion(), base, [expert])
    p, q = torch.softmax(expert, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    score = (expert - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)  # |Δ| · KL(p‖q) of its row
    ranked = score.flatten().sort().values  # 96 entries: Q₁, median, Q₃ at ⌊q·95⌋ = 23, 47, 71
    keep = score >= ranked[47] + 1.5 * (ranked[71] - ranked[23])
    assert 0 < int(keep.sum()) < 20
    assert torch.equal(got, torch.where(keep, expert, base))
    # a change that leaves every softmax exactly as it was (constant rows shifted) has KL 0: every score is 0, so
    # is the threshold, and every entry is kept, as in mergekit
    flat = torch.zeros(4, 8)
    assert torch.equal(_merge(ArceeFusion(), flat, [flat + 0.5]), flat + 0.5)


@pytest.mark.parametrize("strategy, count", [(Slerp(), 2), (NearSwap(), 3), (ArceeFusion(), 2), (NuSlerp(), 3),
                                              (NuSlerp(), 1), (ModelStock(), 1)])
def test_a_count_of_experts_the_method_does_not_merge_is_refused_before_any_work(tmp_path, strategy, count):
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=rf"^{type(strategy).__name__} merges .* got {count}; "):
        merge([{"w": torch.ones(3)}] * count, base, strategy, out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("strategy", [Slerp(), NuSlerp(), MultiSlerp(), Karcher(), ModelStock(), NearSwap(),
                                      ArceeFusion()])
def test_no_continual_form_and_no_linear_form_or_scale(strategy):
    with pytest.raises(NoContinualForm, match=rf"strategy '{strategy.name}' has no continual form: "):
        strategy.continual_form()
    assert not strategy.linear and strategy.linear_form(2) is None and not strategy.scalable


def test_arguments_are_checked_when_built():
    with pytest.raises(ValueError, match=r"NearSwap.t must be in \[0.0, inf\]"):
        NearSwap(t=-1.0)
    with pytest.raises(ValueError, match=r"NuSlerp.nuslerp_flatten must be True or False"):
        NuSlerp(nuslerp_flatten=1)
    with pytest.raises(ValueError, match=r"Karcher.max_iter must be an integer >= 0"):
        Karcher(max_iter=2.5)
    with pytest.raises(ValueError, match=r"Slerp.t must be finite"):
        Slerp(t=float("nan"))
