"""Evaluation helpers: per-task accuracy, normalized score, the report, the λ sweep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_merge import Expert, Fisher, LiNeS, TaskArithmetic, Ties, WeightedMedian, merge
from lightning_merge.tools.evaluation import MergeReport, evaluate, normalized_score, sweep, sweep_scale


def test_evaluate_accuracy_per_task_with_per_task_models():
    x = torch.eye(4)
    y_a = torch.tensor([0, 1, 2, 3])
    y_b = torch.tensor([0, 1, 0, 0])
    identity = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4))
    loaders = {"a": [(x[:2], y_a[:2]), (x[2:], y_a[2:])], "b": [(x, y_b)]}
    scores = evaluate(identity, loaders)
    assert scores == {"a": 1.0, "b": 0.5}
    per_task = evaluate({"a": identity, "b": identity}, {"b": loaders["b"]})
    assert per_task == {"b": 0.5}
    with pytest.raises(KeyError, match="no model for task 'a'"):
        evaluate({"b": identity}, loaders)
    # sequence targets: -100 ignored
    seq = [(x.unsqueeze(0), torch.tensor([[0, 1, -100, 0]]))]
    assert evaluate(identity, {"s": seq})["s"] == pytest.approx(2 / 3)


def test_normalized_score_and_report():
    experts = {"a": 0.8, "b": 0.5}
    assert normalized_score({"a": 0.4, "b": 0.5}, experts) == pytest.approx((0.5 + 1.0) / 2)
    report = MergeReport(experts)
    report.add("merged", {"a": 0.4, "b": 0.5}, scale=1.5)
    data = report.as_dict()
    assert data["merged"]["normalized"] == pytest.approx(0.75) and data["merged"]["scale"] == 1.5
    assert data["experts (own task)"]["normalized"] == 1.0
    text = report.table()
    assert "75.0%" in text and "1.5" in text and "merged" in text


def test_sweep_scale_merges_once_and_equals_the_strategy_at_the_best_scale():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "i": torch.tensor([1, 2])}
    experts = [{"w": base["w"] + torch.randn(6, 5, generator=g), "i": base["i"]} for _ in range(3)]
    tau = sum(e["w"] - base["w"] for e in experts)
    target = base["w"] + 0.7 * tau

    def score(state):
        return -float((state["w"] - target).square().sum())

    result = sweep_scale(TaskArithmetic(), experts, base, score, scales=(0.3, 0.5, 0.7, 1.0))
    assert result.scale == 0.7 and result.strategy == TaskArithmetic(scale=0.7)
    direct = merge(experts, base, TaskArithmetic(scale=0.7))
    torch.testing.assert_close(result.state["w"], direct["w"])
    assert torch.equal(result.state["i"], base["i"])
    assert set(result.scores) == {0.3, 0.5, 0.7, 1.0}
    # nonlinear strategies too: TIES and Fisher at λ are θ₀ + λ·τ*(1)
    ties = sweep_scale(Ties(density=0.5), experts, base, score, scales=(0.4, 1.3))
    torch.testing.assert_close(ties.state["w"], merge(experts, base, Ties(density=0.5, scale=ties.scale))["w"])
    with_stats = [Expert(e, statistics={"fisher": {"w": torch.rand(6, 5, generator=g)}}) for e in experts]
    fisher = sweep_scale(Fisher(), with_stats, base, score, scales=(0.5, 2.0))
    torch.testing.assert_close(
        fisher.state["w"], merge(with_stats, base, Fisher(scale=fisher.scale))["w"], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="needs a base"):
        sweep_scale(TaskArithmetic(), experts, None, score)


def test_sweep_chooses_arguments_jointly_as_brute_force_does_and_gives_the_merge_of_its_strategy():
    """κ with λ for the weighted median: the best of every (κ, λ) by brute force (one merge per κ), and the state
    equals merge() with the returned strategy; a strategy without a scale sweeps its own arguments (LiNeS α, β)."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(8, 6, generator=g)}
    raw = [{"w": base["w"] + torch.randn(8, 6, generator=g)} for _ in range(4)]
    experts = [Expert(e, statistics={"fisher": {"w": torch.rand(8, 6, generator=g) + 0.1}}, name=f"e{i}")
               for i, e in enumerate(raw)]
    target = base["w"] + 0.6 * (raw[0]["w"] - base["w"])

    def score(state):
        return -float((state["w"] - target).square().sum())

    kappas, scales = [0.25, 0.5, 1.0], (0.5, 1.0, 1.5)
    result = sweep(WeightedMedian(), experts, base, score, grid={"kappa": kappas}, scales=scales)
    brute = {(k, s): score(merge(experts, base, WeightedMedian(kappa=k, scale=s))) for k in kappas for s in scales}
    best = max(brute.values())
    assert result.score == pytest.approx(best, rel=1e-5)
    assert brute[(result.arguments["kappa"], result.arguments["scale"])] == pytest.approx(best, rel=1e-5)
    assert len(result.results) == len(brute)
    for args, value in result.results:
        assert value == pytest.approx(brute[(args["kappa"], args["scale"])], rel=1e-5)
    assert result.strategy == WeightedMedian(kappa=result.arguments["kappa"], scale=result.arguments["scale"])
    torch.testing.assert_close(result.state["w"], merge(experts, base, result.strategy)["w"], rtol=1e-5, atol=1e-5)

    lines = sweep(LiNeS(TaskArithmetic()), raw, base, score, grid={"alpha": [0.2, 0.6], "beta": [0.0, 0.5]},
                  scales=None)
    assert [tuple(a.values()) for a, _ in lines.results] == [(0.2, 0.0), (0.2, 0.5), (0.6, 0.0), (0.6, 0.5)]
    want = max(lines.results, key=lambda r: r[1])
    assert lines.arguments == want[0] and lines.strategy == LiNeS(TaskArithmetic(), **want[0])
    torch.testing.assert_close(lines.state["w"], merge(raw, base, lines.strategy)["w"])

    with pytest.raises(ValueError, match="no argument 'kapa'"):
        sweep(WeightedMedian(), experts, base, score, grid={"kapa": [0.5]})
    with pytest.raises(ValueError, match="scales="):
        sweep(WeightedMedian(), experts, base, score, grid={"scale": [0.5]})
    with pytest.raises(ValueError, match="scales=None"):
        sweep(LiNeS(TaskArithmetic()), raw, base, score, grid={"beta": [0.0]})
    with pytest.raises(ValueError, match="kappa"):  # a bad value is refused before anything merges
        sweep(WeightedMedian(), experts, base, score, grid={"kappa": [0.5, -1.0]})
