"""mergekit's della, della_linear, sce, ram and ramplus_tl as strategies: their formulas on values, DELLA's
distribution (its draws are seeded per tensor and expert, not mergekit's: tested by expectation and kept fraction),
and PerTensor (one strategy per tensor). Parity with mergekit itself: tests/integration/parity."""

import pytest
import torch

from lightning_merge import merge
from lightning_merge.strategies import (
    RAM,
    SCE,
    Dare,
    Della,
    NoContinualForm,
    PerTensor,
    RAMPlusTL,
    Strategy,
    TaskArithmetic,
    Ties,
)
from lightning_merge.strategies import functional as F


def stack(n=3, shape=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    taus = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base, [base + t for t in taus], taus


def run(strategy, base, tensors, name="w"):
    return strategy.merge_tensor(name, base, tensors, [{} for _ in tensors])


# -- DELLA ----------------------------------------------------------------------------------------------------------


def test_della_probabilities_grow_with_the_magnitude_rank_in_each_row():
    tau = torch.tensor([[3.0, -1.0, 2.0], [0.5, -4.0, 0.0]])
    got = F.della_probabilities(tau, 0.5, 0.1)
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.4, 0.5], [0.5, 0.6, 0.4]]))
    torch.testing.assert_close(F.della_probabilities(torch.tensor([1.0, -3.0]), 0.5, 0.1), torch.tensor([0.4, 0.6]))
    # a row of one entry (mergekit divides 0 by 0 there and fails): kept with density
    torch.testing.assert_close(F.della_probabilities(torch.tensor([[2.0], [1.0]]), 0.3, 0.1),
                               torch.tensor([[0.3], [0.3]]))


def test_della_keeps_density_of_each_row_and_is_unbiased_with_inverse_rescale():
    base, tensors, taus = stack(n=1, shape=(40, 60))
    runs = [run(Della(density=0.4, epsilon=0.2, rescale="inverse", seed=s), base, tensors) - base for s in range(300)]
    kept = torch.stack([r != 0 for r in runs]).double()
    assert abs(kept.mean().item() - 0.4) < 0.005
    probs = F.della_probabilities(taus[0], 0.4, 0.2)
    assert (kept.mean(0) - probs).abs().max() < 0.12  # each entry kept with its own probability
    mean = sum(runs) / len(runs)
    assert (mean - taus[0]).abs().mean() < 0.08 * taus[0].abs().mean()  # E[τ̂] = τ: kept entries ÷ their p
    # without rescale E[τ̂] = p ⊙ τ: the large entries (p up to 0.6) survive more than the small (p from 0.2)
    plain = sum(run(Della(density=0.4, epsilon=0.2, rescale="none", seed=s), base, tensors) - base
                for s in range(300)) / 300
    assert (plain - probs * taus[0]).abs().mean() < 0.08 * (probs * taus[0]).abs().mean()


def test_della_l1_rescale_matches_the_norm_and_draws_per_tensor_and_expert():
    base, tensors, taus = stack(n=1, shape=(30, 30))
    got = run(Della(density=0.5, combine="linear"), base, tensors) - base
    torch.testing.assert_close(got.abs().sum(), taus[0].abs().sum())
    base, tensors, _ = stack()
    a = run(Della(density=0.5, seed=1), base, tensors, name="x")
    assert torch.equal(a, run(Della(density=0.5, seed=1), base, tensors, name="x"))
    assert not torch.equal(a, run(Della(density=0.5, seed=2), base, tensors, name="x"))
    assert not torch.equal(a, run(Della(density=0.5, seed=1), base, tensors, name="y"))


def test_della_at_full_density_is_its_deterministic_combine():
    base, tensors, _ = stack()
    w = [1.0, 0.5, 1.5]
    torch.testing.assert_close(run(Della(weights=w, scale=0.7), base, tensors),
                               run(Ties(density=1.0, weights=w, scale=0.7), base, tensors))
    torch.testing.assert_close(run(Della(weights=w, combine="linear"), base, tensors),
                               run(TaskArithmetic(weights=w), base, tensors))


def test_della_refuses_probabilities_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"Della: density 0.9 ± epsilon 0.15 must stay inside \(0, 1\)"):
        Della(density=0.9)
    with pytest.raises(ValueError, match="expert 2"):
        Della(density=[0.5, 0.1], epsilon=0.15)
    Della(density=1.0, epsilon=0.5)  # nothing drawn at density 1
    assert Strategy.from_dict(Della(density=0.5, combine="linear").to_dict()) == Della(density=0.5, combine="linear")


def test_della_linear_folds_and_della_with_election_does_not():
    Della(density=0.5, combine="linear").continual_form()
    with pytest.raises(NoContinualForm):
        Della(density=0.5).continual_form()


# -- SCE -------------------------------------------------------------------------------------------------------------


def _sce_by_hand(base, taus, fraction):
    tau = torch.stack(taus)
    if fraction < 1:
        var = tau.var(0, unbiased=False).reshape(-1)
        k = int(torch.count_nonzero(var) * fraction)
        order = sorted(range(var.numel()), key=lambda i: -float(var[i]))[:k]
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[order] = True
        tau = tau * mask.view(base.shape)
    w = torch.tensor([float((t ** 2).mean()) for t in tau], dtype=tau.dtype)
    w = w / w.sum()
    out = torch.zeros_like(base)
    for idx in range(base.numel()):
        col = tau.reshape(len(taus), -1)[:, idx]
        sign = 1.0 if float(col.sum()) >= 0 else -1.0
        num = sum(float(w[i] * col[i]) for i in range(len(taus)) if float(torch.sign(col[i])) == sign)
        den = sum(float(w[i]) for i in range(len(taus)) if float(torch.sign(col[i])) == sign)
        out.view(-1)[idx] = num / max(den, 1e-6)
    return base + out


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_sce_by_hand(fraction):
    base, tensors, taus = stack(shape=(5, 6))
    torch.testing.assert_close(run(SCE(select_topk=fraction), base, tensors), _sce_by_hand(base, taus, fraction))


def test_sce_scale_is_a_step_along_the_merged_task_vector():
    base, tensors, _ = stack()
    one = run(SCE(select_topk=0.5), base, tensors)
    torch.testing.assert_close(run(SCE(select_topk=0.5, scale=0.3), base, tensors), base + 0.3 * (one - base))
    with pytest.raises(NoContinualForm):
        SCE().continual_form()


# -- RAM ------------------------------------------------------------------------------------------------------------


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(5)
    experts = [torch.tensor([1.0, 2.0, 0.0, 1e-6, 4.0]), torch.tensor([0.0, 4.0, 0.0, 0.0, -2.0])]
    torch.testing.assert_close(run(RAM(), base, experts), torch.tensor([1.0, 3.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(run(RAM(epsilon=1.5), base, experts), torch.tensor([0.0, 3.0, 0.0, 0.0, 1.0]))


def test_ramplus_amplifies_unique_changes_by_the_shared_to_unique_ratio():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.0, 0.0])  # unique: 0, 1, 2 (3 entries); shared: 3 (1 entry)
    b = torch.tensor([0.0, 0.0, 0.0, 1.0, 7.0, 0.0])  # unique: 4 (1 entry); shared: 3 (1 entry)
    got = run(RAMPlusTL(r=0.5, alpha=0.6), base, [a, b])
    la, lb = 1 + 0.5 * min(1 / 3, 0.6), 1 + 0.5 * min(1 / 1, 0.6)
    torch.testing.assert_close(got, torch.tensor([la, 2 * la, 3 * la, 3.0, 7 * lb, 0.0]))
    with pytest.raises(NoContinualForm):
        RAMPlusTL().continual_form()


# -- PerTensor ------------------------------------------------------------------------------------------------------


def _model():
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.w": torch.randn(4, 5, generator=g), "layers.1.w": torch.randn(4, 5, generator=g),
            "head": torch.randn(3, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    return base, experts


def test_per_tensor_merges_each_tensor_with_its_strategy():
    base, experts = _model()
    a, b = TaskArithmetic(weights=[0.2, 0.8]), Ties(density=0.5)
    table = PerTensor(strategies=[a, b], tensors={"layers.0.w": 0, "layers.1.w": 1}, default=0)
    got = merge(experts, base, table)
    assert torch.equal(got["layers.0.w"], merge(experts, base, a)["layers.0.w"])
    assert torch.equal(got["layers.1.w"], merge(experts, base, b)["layers.1.w"])
    assert torch.equal(got["head"], merge(experts, base, a)["head"])
    assert Strategy.from_dict(table.to_dict()) == table
    assert not table.linear and table.linear_form(2, "layers.0.w") == a.linear_form(2)
    with pytest.raises(NoContinualForm):
        table.continual_form()


def test_per_tensor_refuses_what_it_cannot_merge_before_any_tensor():
    base, experts = _model()
    with pytest.raises(ValueError, match="no strategy for tensor 'head'"):
        merge(experts, base, PerTensor(strategies=[TaskArithmetic()], tensors={"layers.0.w": 0, "layers.1.w": 0}))
    with pytest.raises(ValueError, match="first pass"):
        PerTensor(strategies=[Ties(topk="model")], default=0)
    with pytest.raises(ValueError, match="index into strategies"):
        PerTensor(strategies=[TaskArithmetic()], tensors={"x": 1})
    with pytest.raises(ValueError, match="3 values but 2 experts"):
        merge(experts, base, PerTensor(strategies=[Dare(drop_rate=[0.1, 0.2, 0.3])], default=0))
