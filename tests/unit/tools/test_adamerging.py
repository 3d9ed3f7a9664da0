"""AdaMerging: the merged model it computes, its entropy, what a Trainer learns (one process and ddp_spawn), and the
strategy it hands to merge() (the same model)."""

from __future__ import annotations

import math

import pytest
import torch
from capture_helpers import RankInterleaved, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import LayerwiseTaskArithmetic, TaskArithmetic, merge
from lightning_merge.tools.adamerging import AdaMerging, entropy_loss


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _family(n=3, seed=0):
    torch.manual_seed(seed)
    base = _net().state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    x = torch.randn(32, 6, generator=g)
    return base, experts, x


def _fit(ada, loader, root, steps=6, **kwargs):
    trainer(root, [], max_steps=steps, max_epochs=-1, **kwargs).fit(ada, loader)
    return ada


def test_entropy_loss_values():
    assert math.isclose(float(entropy_loss(torch.zeros(5, 4))), math.log(4), rel_tol=1e-6)
    assert float(entropy_loss(torch.tensor([[50.0, 0.0, 0.0]]))) < 1e-6
    logits = torch.randn(3, 7, 5)  # a sequence model's logits: every position counts
    p = torch.softmax(logits.reshape(-1, 5), -1)
    torch.testing.assert_close(entropy_loss(logits), -(p * torch.log(p + 1e-8)).sum(-1).mean())


def test_the_merged_model_is_task_arithmetic_at_its_coefficients():
    base, experts, x = _family()
    ada = AdaMerging(_net(), experts, base, init=0.3)
    assert ada.lambdas.shape == (3, 4) and ada.columns == ["0.weight", "0.bias", "2.weight", "2.bias"]
    want = merge(experts, base, TaskArithmetic(scale=0.3))
    got = ada.merged_parameters()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    reference = _net()
    reference.load_state_dict(want)
    torch.testing.assert_close(ada(x), reference(x), rtol=1e-5, atol=1e-6)
    blocks = AdaMerging(_net(), experts, base, granularity="block")
    assert blocks.columns == ["0", "2"] and blocks.lambdas.shape == (3, 2)


@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_training_lowers_the_entropy_and_merge_writes_the_same_model(tmp_path, granularity):
    base, experts, x = _family()
    ada = AdaMerging(_net(), experts, base, granularity=granularity, lr=5e-2)
    before = float(ada.entropy((x,)).detach())
    _fit(ada, DataLoader(TensorDataset(x), batch_size=32), tmp_path, steps=15)
    after = float(ada.entropy((x,)).detach())
    assert after < before - 1e-3, (before, after)
    assert not torch.allclose(ada.lambdas.detach(), torch.full_like(ada.lambdas, 0.3))
    strategy = ada.strategy()
    assert isinstance(strategy, LayerwiseTaskArithmetic)
    written = merge(experts, base, strategy)
    merged = ada.merged_parameters()
    for k in merged:
        torch.testing.assert_close(written[k], merged[k].detach(), rtol=1e-5, atol=1e-6)
    from lightning_merge.strategies import Strategy

    assert Strategy.from_dict(strategy.to_dict()) == strategy  # a recipe can hold what was learned


def test_gradient_of_the_entropy_matches_finite_differences():
    base, experts, x = _family()
    ada = AdaMerging(_net().double(), [{k: v.double() for k, v in e.items()} for e in experts],
                     {k: v.double() for k, v in base.items()})
    ada._base = {k: v.double() for k, v in ada._base.items()}
    ada._taus = [{k: v.double() for k, v in t.items()} for t in ada._taus]
    ada.lambdas.data = ada.lambdas.data.double()
    xd = x.double()

    def loss():
        probs = torch.softmax(ada(xd), -1)
        return -(probs * torch.log(probs + 1e-8)).sum(-1).mean()

    loss().backward()
    grad = ada.lambdas.grad.clone()
    h = 1e-6
    for k, j in ((0, 0), (1, 2), (2, 3)):
        with torch.no_grad():
            ada.lambdas[k, j] += h
            up = float(loss())
            ada.lambdas[k, j] -= 2 * h
            down = float(loss())
            ada.lambdas[k, j] += h
        assert math.isclose(float(grad[k, j]), (up - down) / (2 * h), rel_tol=1e-4, abs_tol=1e-9)


def test_tasks_with_their_own_heads_and_clamping(tmp_path):
    """A mapping of per-task logits sums the entropies; clamp keeps λ in [0, 1]; include merges only some tensors."""
    base, experts, x = _family()
    heads = [nn.Linear(3, 2), nn.Linear(3, 4)]

    def logits_fn(ada, batch):
        return {"a": heads[0](ada(batch[0])), "b": heads[1](ada(batch[0]))}

    ada = AdaMerging(_net(), experts, base, logits_fn=logits_fn, clamp=True, lr=0.5, include=r"^2\.")
    out = ada((x,)[0])
    want = entropy_loss(heads[0](out)) + entropy_loss(heads[1](out))
    torch.testing.assert_close(ada.entropy((x,)), want)
    _fit(ada, DataLoader(TensorDataset(x), batch_size=32), tmp_path, steps=5)
    assert float(ada.lambdas.detach().min()) >= 0.0 and float(ada.lambdas.detach().max()) <= 1.0
    written = merge(experts, base, ada.strategy())
    torch.testing.assert_close(written["0.weight"], base["0.weight"])  # not included: the base
    torch.testing.assert_close(written["2.weight"], ada.merged_parameters()["2.weight"].detach())


def test_refusals():
    base, experts, _ = _family()
    with pytest.raises(ValueError, match="has no tensor '2.bias'"):
        AdaMerging(_net(), [experts[0], {k: v for k, v in experts[1].items() if k != "2.bias"}], base)
    with pytest.raises(ValueError, match="model has no tensor 'extra'"):
        AdaMerging(_net(), [{**e, "extra": torch.ones(2)} for e in experts], {**base, "extra": torch.ones(2)})
    with pytest.raises(ValueError, match="granularity"):
        AdaMerging(_net(), experts, base, granularity="layer")
    with pytest.raises(ValueError, match="include"):
        AdaMerging(_net(), experts, base, granularity="block", include="0")


@pytest.mark.slow
def test_ddp_spawn_learns_what_one_process_learns_on_the_same_global_batch(tmp_path):
    base, experts, x = _family()
    single = AdaMerging(_net(), experts, base, lr=5e-2)
    _fit(single, DataLoader(TensorDataset(x), batch_size=16), tmp_path / "one", steps=4)
    ddp = AdaMerging(_net(), experts, base, lr=5e-2)
    _fit(ddp, DataLoader(TensorDataset(x), batch_size=8, sampler=RankInterleaved(32)), tmp_path / "ddp", steps=4,
         strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    torch.testing.assert_close(ddp.lambdas.detach(), single.lambdas.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single.lambdas.detach(), torch.full_like(single.lambdas, 0.3))
