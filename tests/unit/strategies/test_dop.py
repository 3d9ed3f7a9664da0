"""DOP (dual orthogonal projections, continual): its rule's values and properties. Parity with FusionBench's own
functions is in tests/integration/parity/test_parity_fusionbench.py."""

import pytest
import torch

from lightning_merge import DOP, ContinualState, Strategy, merge
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.strategies.dop import dop_loss, dop_optimize, dop_subspace, min_norm_pair


def _models(n, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"fc.weight": (6, 5), "fc.bias": (6,), "norm.weight": (5,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, experts


def _objective(x, targets, strategy, weights):
    total = 0.0
    for w, t in zip(weights, targets):
        u, s, v = dop_subspace(t, strategy.svd_epsilon)
        total += w * float(dop_loss(x - t, s[:, None] * u.T, v, s, strategy.svd_proj_space))
    return total


def test_the_subspace_keeps_the_triplets_before_the_share_reaches_epsilon():
    """FusionBench's searchsorted: s = 4, 3, 2, 1 has cumulative shares .4, .7, .9, 1; ε = .8 keeps two triplets
    (the third reaches .9 ≥ ε and is not kept), ε = .95 keeps three, ε = .3 none; a zero τ has no subspace."""
    q1, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
    q2, _ = torch.linalg.qr(torch.randn(5, 4, generator=torch.Generator().manual_seed(2)))
    tau = q1 @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ q2.T
    assert [dop_subspace(tau, eps)[1].numel() for eps in (0.3, 0.8, 0.95)] == [0, 2, 3]
    u, s, v = dop_subspace(tau, 0.95)
    torch.testing.assert_close(s, torch.tensor([4.0, 3.0, 2.0]))
    torch.testing.assert_close(u @ torch.diag(s) @ v.T + q1[:, 3:] @ q2[:, 3:].T, tau, atol=1e-5, rtol=0)
    assert dop_subspace(torch.zeros(6, 5), 0.99999)[1].numel() == 0


def test_the_min_norm_pair_is_the_closed_form():
    """Orthogonal g₀, g₁: γ = ‖g₁‖² / (‖g₀‖² + ‖g₁‖²); a gradient inside the other's span ends the segment."""
    g0, g1 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    gamma, rest = min_norm_pair(g0, g1)
    assert float(gamma) == pytest.approx(1 / 10) and float(rest) == pytest.approx(9 / 10)
    assert min_norm_pair(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))[0] == 0.999  # <g0,g1> ≥ ‖g0‖²
    assert min_norm_pair(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))[0] == 0.001


def test_fixed_weights_converge_to_the_quadratic_minimiser():
    """Without MGDA the objective α L₀ + (1 − α) L₁ is quadratic: its minimiser solves
    Σ wᵢ (Pᵢ X + X Qᵢ) = Σ wᵢ (Pᵢ τᵢ + τᵢ Qᵢ), Pᵢ = Uᵢ diag(sᵢ²) Uᵢᵀ, Qᵢ = Vᵢ diag(sᵢ²) Vᵢᵀ (float64, Kronecker
    form); enough Adam steps reach it."""
    g = torch.Generator().manual_seed(3)
    previous, tau = 0.1 * torch.randn(6, 5, generator=g), 0.1 * torch.randn(6, 5, generator=g)
    strategy = DOP(mgda=False, alpha=0.7, lr=1e-3, num_steps=4000, svd_epsilon=0.99999, device="cpu")
    lhs, rhs = torch.zeros(30, 30, dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64)
    for w, t in ((0.7, previous), (0.3, tau)):
        u, s, v = (a.double() for a in dop_subspace(t, strategy.svd_epsilon))
        p, q = u @ torch.diag(s**2) @ u.T, v @ torch.diag(s**2) @ v.T
        lhs += w * (torch.kron(p, torch.eye(5, dtype=torch.float64)) + torch.kron(torch.eye(6, dtype=torch.float64), q))
        rhs += w * (p @ t.double() + t.double() @ q)
    want = torch.linalg.solve(lhs, rhs.reshape(-1)).reshape(6, 5)
    got = dop_optimize(previous, tau, strategy)
    start = (previous + tau) / 2
    assert float((got.double() - want).abs().max()) < 2e-3 * float((start.double() - want).abs().max())


def test_the_steps_decrease_the_weighted_objective():
    """Without MGDA each run of more steps ends lower on α L₀ + (1 − α) L₁ (from the mean, 0 steps)."""
    base, (e0, e1) = _models(2, seed=4)
    previous, tau = e0["fc.weight"] - base["fc.weight"], e1["fc.weight"] - base["fc.weight"]
    values = []
    for steps in (0, 10, 50, 200):
        strategy = DOP(mgda=False, alpha=0.6, lr=1e-3, num_steps=steps, device="cpu")
        values.append(_objective(dop_optimize(previous, tau, strategy), [previous, tau], strategy, [0.6, 0.4]))
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_the_same_expert_twice_is_that_expert():
    """Both losses vanish at the mean of two equal task vectors: no step moves it."""
    base, (expert,) = _models(1)
    got = merge([expert, expert, expert], base, DOP(num_steps=30, device="cpu"))
    for k in base:
        torch.testing.assert_close(got[k], expert[k], rtol=0, atol=1e-6)


def test_without_steps_the_running_merge_halves_each_earlier_share():
    """num_steps = 0 (and every non-linear tensor always): θ₀ + τ₁/4 + τ₂/4 + τ₃/2, FusionBench's running mean of
    the merge and the new expert."""
    base, experts = _models(3)
    got = merge(experts, base, DOP(num_steps=0, device="cpu"))
    full = merge(experts, base, DOP(num_steps=20, lr=1e-3, device="cpu"))
    for k in base:
        taus = [e[k] - base[k] for e in experts]
        want = base[k] + taus[0] / 4 + taus[1] / 4 + taus[2] / 2
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
        if k != "fc.weight":
            torch.testing.assert_close(full[k], want, rtol=0, atol=1e-6)
    assert float((full["fc.weight"] - got["fc.weight"]).abs().max()) > 1e-3  # the linear weight was optimised


def test_one_expert_is_itself_and_the_order_matters():
    base, experts = _models(2)
    strategy = DOP(num_steps=20, lr=1e-3, device="cpu")
    torch.testing.assert_close(merge(experts[:1], base, strategy)["fc.weight"], experts[0]["fc.weight"])
    ab, ba = merge(experts, base, strategy), merge(experts[::-1], base, strategy)
    assert float((ab["fc.weight"] - ba["fc.weight"]).abs().max()) > 1e-4


def test_deterministic_and_the_continual_state_gives_the_batch_model(tmp_path):
    """No randomness: two merges agree bit for bit; adding experts one at a time gives the batch merge."""
    base, experts = _models(3, seed=6)
    strategy = DOP(num_steps=15, lr=1e-3, device="cpu")
    first, second = merge(experts, base, strategy), merge(experts, base, strategy)
    assert all(torch.equal(first[k], second[k]) for k in base)
    save_tensors(tmp_path / "base.safetensors", base)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=strategy)
    for i, e in enumerate(experts):
        save_tensors(tmp_path / f"e{i}.safetensors", e)
        state.add(tmp_path / f"e{i}.safetensors")
    got = state.state_dict()
    for k in base:
        torch.testing.assert_close(got[k], first[k], rtol=1e-5, atol=1e-7)


def test_declarations_and_round_trip():
    strategy = DOP(lr=1e-3, num_steps=7, mgda=False, svd_proj_space="v")
    assert Strategy.from_dict(strategy.to_dict()) == strategy
    assert DOP().to_dict() == {"name": "dop", "lr": 1e-4, "num_steps": 200, "mgda": True, "ema": True,
                               "ema_beta": 0.999, "alpha": 0.8, "svd_epsilon": 0.99999, "svd_proj_space": "uv",
                               "not_linear": DOP().not_linear, "device": None}
    assert not strategy.linear and not strategy.scalable and not strategy.global_pass and not strategy.row_local
    assert strategy.continual_form().quantities == (("x", torch.float32),)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), r"DOP\.lr"), (dict(num_steps=2.5), r"DOP\.num_steps"), (dict(mgda="yes"), r"DOP\.mgda"),
    (dict(alpha=1.5), r"DOP\.alpha"), (dict(ema_beta=2.0), r"DOP\.ema_beta"),
    (dict(svd_epsilon=-0.1), r"DOP\.svd_epsilon"), (dict(svd_proj_space="w"), r"DOP\.svd_proj_space"),
    (dict(not_linear="("), r"DOP\.not_linear"), (dict(device="tpu:x"), r"DOP\.device"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DOP(**kwargs)
