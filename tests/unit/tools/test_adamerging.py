"""AdaMerging: the merged model it computes, its entropy, what a Trainer learns (one process and ddp_spawn), and the
strategy it hands to merge() (the same model); buffers (BatchNorm), include=, the task-wise mode (against FusionBench
when a fusion-bench environment is found) and padded sequence positions."""

from __future__ import annotations

import math

import pytest
import torch
from capture_helpers import RankInterleaved, trainer
from conftest import FUSION_BENCH, fusion_bench_runs, mlp_experts, tiny_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import LayerwiseTaskArithmetic, TaskArithmetic, merge
from lightning_merge.tools.adamerging import AdaMerging, entropy_loss


def _family(n=3, seed=0):
    base, experts, g = mlp_experts(n, seed)
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
    ada = AdaMerging(tiny_mlp(), experts, base, init=0.3)
    assert ada.lambdas.shape == (3, 4) and ada.columns == ["0.weight", "0.bias", "2.weight", "2.bias"]
    want = merge(experts, base, TaskArithmetic(scale=0.3))
    got = ada.merged_parameters()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    reference = tiny_mlp()
    reference.load_state_dict(want)
    torch.testing.assert_close(ada(x), reference(x), rtol=1e-5, atol=1e-6)
    blocks = AdaMerging(tiny_mlp(), experts, base, granularity="block")
    assert blocks.columns == ["0", "2"] and blocks.lambdas.shape == (3, 2)


@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_training_lowers_the_entropy_and_merge_writes_the_same_model(tmp_path, granularity):
    base, experts, x = _family()
    ada = AdaMerging(tiny_mlp(), experts, base, granularity=granularity, lr=5e-2)
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
    ada = AdaMerging(tiny_mlp().double(), [{k: v.double() for k, v in e.items()} for e in experts],
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

    ada = AdaMerging(tiny_mlp(), experts, base, logits_fn=logits_fn, clamp=True, lr=0.5, include=r"^2\.")
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
        AdaMerging(tiny_mlp(), [experts[0], {k: v for k, v in experts[1].items() if k != "2.bias"}], base)
    with pytest.raises(ValueError, match="model has no tensor 'extra'"):
        AdaMerging(tiny_mlp(), [{**e, "extra": torch.ones(2)} for e in experts], {**base, "extra": torch.ones(2)})
    with pytest.raises(ValueError, match="granularity"):
        AdaMerging(tiny_mlp(), experts, base, granularity="layer")
    with pytest.raises(ValueError, match="include='nothing' matches none"):
        AdaMerging(tiny_mlp(), experts, base, include="nothing")


@pytest.mark.slow
def test_ddp_spawn_learns_what_one_process_learns_on_the_same_global_batch(tmp_path):
    base, experts, x = _family()
    single = AdaMerging(tiny_mlp(), experts, base, lr=5e-2)
    _fit(single, DataLoader(TensorDataset(x), batch_size=16), tmp_path / "one", steps=4)
    ddp = AdaMerging(tiny_mlp(), experts, base, lr=5e-2)
    _fit(ddp, DataLoader(TensorDataset(x), batch_size=8, sampler=RankInterleaved(32)), tmp_path / "ddp", steps=4,
         strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    torch.testing.assert_close(ddp.lambdas.detach(), single.lambdas.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single.lambdas.detach(), torch.full_like(single.lambdas, 0.3))


def _load(state) -> nn.Module:
    net = tiny_mlp()
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize("granularity", ["tensor", "block", "task"])
def test_include_trains_on_the_network_it_writes(tmp_path, granularity):
    """Issue 33: tensors outside include are the base's during training (as written), not the model's own weights."""
    base, experts, x = _family()
    model = tiny_mlp()  # a freshly built module: its own weights are neither the base's nor an expert's
    ada = AdaMerging(model, experts, base, granularity=granularity, include=r"^2\.", lr=5e-2)
    _fit(ada, DataLoader(TensorDataset(x), batch_size=32), tmp_path, steps=3)
    written = _load(merge(experts, base, ada.strategy()))
    torch.testing.assert_close(written[0].weight, base["0.weight"])
    with torch.no_grad():
        torch.testing.assert_close(ada(x), written(x), rtol=1e-5, atol=1e-6)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def _bn_family(n=3, seed=0):
    torch.manual_seed(seed)
    base = _bn_net().state_dict()
    base["1.running_mean"] = torch.tensor([0.2, -0.1])
    base["1.running_var"] = torch.tensor([1.5, 0.7])
    g = torch.Generator().manual_seed(seed + 1)
    experts = [{k: v + 0.3 * torch.rand(v.shape, generator=g) if v.is_floating_point() else v + 5
                for k, v in base.items()} for _ in range(n)]
    x = torch.randn(16, 1, 6, 6, generator=g)
    return base, experts, x


def test_batchnorm_buffers_come_from_the_base_and_parameters_are_merged(tmp_path):
    """Issue 33: a model with BatchNorm trains (its running statistics were merged with λ and required grad); only
    parameters get λ, buffers are the base's during training and in the written model, and are not updated."""
    base, experts, x = _bn_family()
    ada = AdaMerging(_bn_net(), experts, base, lr=5e-2)
    assert ada.columns == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    _fit(ada, DataLoader(TensorDataset(x), batch_size=8), tmp_path, steps=4)
    assert not torch.allclose(ada.lambdas.detach(), torch.full_like(ada.lambdas, 0.3))
    others = ada.other_tensors()  # what the model is called with besides the merged parameters
    assert sorted(others) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    for name in others:
        torch.testing.assert_close(others[name], base[name])  # train mode did not update the base's statistics
    written = merge(experts, base, ada.strategy())
    for name in ("1.running_mean", "1.running_var"):  # num_batches_tracked: merge's rule, the maximum (unread here)
        torch.testing.assert_close(written[name], base[name])
    merged = ada.merged_parameters()
    for name in ada.columns:
        torch.testing.assert_close(written[name], merged[name].detach(), rtol=1e-5, atol=1e-6)
    reference = _bn_net()
    reference.load_state_dict(written)
    ada.eval()
    with torch.no_grad():
        torch.testing.assert_close(ada(x), reference.eval()(x), rtol=1e-5, atol=1e-6)


def test_task_wise_is_one_coefficient_per_expert(tmp_path):
    """granularity='task': θ = θ₀ + Σₖ λₖ τₖ with one λₖ for every parameter (buffers: the base)."""
    base, experts, x = _bn_family()
    ada = AdaMerging(_bn_net(), experts, base, granularity="task", lr=5e-2)
    assert ada.columns == ["all"] and ada.lambdas.shape == (3, 1)
    _fit(ada, DataLoader(TensorDataset(x), batch_size=8), tmp_path, steps=4)
    lam = ada.coefficients()["all"]
    assert len(set(lam)) == 3 and lam != [0.3, 0.3, 0.3]
    written = merge(experts, base, ada.strategy())
    for name in ("0.weight", "1.bias", "4.weight"):
        want = base[name] + sum(lam_k * (e[name] - base[name]) for lam_k, e in zip(lam, experts))
        torch.testing.assert_close(written[name], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(written["1.running_var"], base["1.running_var"])



FUSIONBENCH_SCRIPT = """
import sys, torch
from torch import nn
from fusion_bench.method.adamerging.entropy_loss import entropy_loss
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel, get_task_wise_weights
d = torch.load(sys.argv[1], weights_only=True)
def net(state):
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    m.load_state_dict(state)
    return m
pretrained, finetuned = net(d["base"]), [net(e) for e in d["experts"]]
options = dict(pretrained_model=pretrained, finetuned_models=finetuned, clamp_weights=False, tie_weights=True,
               strict=False)  # FusionBench's clip/resnet AdaMerging configurations
if sys.argv[3] == "task":
    module = TaskWiseMergedModel(task_wise_weight=get_task_wise_weights(len(finetuned), 0.3), **options)
else:
    layers = len([p for p in pretrained.parameters() if p.requires_grad])
    module = LayerWiseMergedModel(layer_wise_weight=get_layer_wise_weights(len(finetuned), layers, 0.3), **options)
optimizer = torch.optim.Adam([module.merge_weight], lr=d["lr"])
module.train()
module.merge_weights()
for x in d["batches"]:  # LayerWiseAdaMergingAlgorithm.test_time_adaptation with one task
    entropy_loss(module(x)).backward(retain_graph=True)
    optimizer.step()
    optimizer.zero_grad()
    module.merge_weights()
merged = {k: v.detach() for k, v in module.merge_and_unload().state_dict().items()}
torch.save({"weight": module.merge_weight.detach(), "merged": merged}, sys.argv[2])
"""


ADA_LR, ADA_BATCH = 5e-2, 4


@pytest.fixture(scope="module")
def adamerging_references(tmp_path_factory):
    """FusionBench's task-wise and layer-wise AdaMerging of the family below, from one FusionBench process."""
    folder = tmp_path_factory.mktemp("adamerging")
    base, experts, x = _bn_family()
    torch.save({"base": base, "experts": experts, "lr": ADA_LR, "batches": list(x.split(ADA_BATCH))},
               folder / "in.pt")
    fusion_bench_runs(FUSIONBENCH_SCRIPT, [[folder / "in.pt", folder / f"{g}.pt", g] for g in ("task", "tensor")],
                      folder)
    return {g: torch.load(folder / f"{g}.pt", weights_only=True) for g in ("task", "tensor")}


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("granularity", ["task", "tensor"])
def test_matches_fusionbench_adamerging(tmp_path, adamerging_references, granularity):
    """Task-wise and layer-wise AdaMerging against FusionBench's TaskWiseMergedModel / LayerWiseMergedModel and its
    test-time adaptation loop (Adam, entropy_loss, train mode), on a conv + BatchNorm model, same batches in order."""
    base, experts, x = _bn_family()
    lr, batch = ADA_LR, ADA_BATCH
    reference = adamerging_references[granularity]
    ada = AdaMerging(_bn_net(), experts, base, granularity=granularity, lr=lr)
    _fit(ada, DataLoader(TensorDataset(x), batch_size=batch), tmp_path, steps=len(x) // batch)
    weight = reference["weight"] if granularity == "tensor" else reference["weight"][:, None]
    assert not torch.allclose(weight, torch.full_like(weight, 0.3))
    torch.testing.assert_close(ada.lambdas.detach(), weight, rtol=1e-5, atol=1e-6)
    written = merge(experts, base, ada.strategy())
    for name in ada.names:  # FusionBench's written buffers are the base's updated in place by its train-mode passes
        torch.testing.assert_close(written[name], reference["merged"][name], rtol=1e-5, atol=1e-6)


class _Tokens(nn.Module):
    """A tiny sequence model: logits (B, T, V) per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids)))


def test_sequence_entropy_averages_over_positions_that_are_not_padding():
    torch.manual_seed(0)
    base = _Tokens().state_dict()
    experts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    ada = AdaMerging(_Tokens(), experts, base)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = ada.entropy({"input_ids": ids, "attention_mask": mask})
    p = torch.softmax(ada(ids), -1)
    per_position = -(p * torch.log(p + 1e-8)).sum(-1)
    torch.testing.assert_close(loss, per_position[mask.bool()].mean())
    repadded = torch.tensor([[1, 2, 3, 4], [5, 6, 9, 10]])  # other tokens at the padded positions
    torch.testing.assert_close(ada.entropy({"input_ids": repadded, "attention_mask": mask}), loss)
    labels = torch.tensor([[7, 7, 7, 7], [7, 7, -100, -100]])  # no attention_mask: labels != -100
    torch.testing.assert_close(ada.entropy({"input_ids": repadded, "labels": labels}), loss)
    torch.testing.assert_close(entropy_loss(torch.randn(2, 3, 5), mask=torch.zeros(2, 3)), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"padding mask .* is \(2, 3\)"):
        ada.entropy({"input_ids": ids, "attention_mask": mask[:, :3]})
