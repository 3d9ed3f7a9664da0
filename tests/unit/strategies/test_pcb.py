"""PCB-merging against the authors' reference steps computed on the flattened model (sort-based quantiles, the
reference's min-max normalisation), the exact model-wide order statistics, and the strategy's declarations."""

from __future__ import annotations

import pytest
import torch

from lightning_merge import PCB, Expert, Strategy, merge
from lightning_merge.engine.run import open_inputs, plan_merge
from lightning_merge.strategies.pcb import model_order_statistics

SHAPES = {"a.weight": (12, 9), "a.bias": (12,), "b.weight": (7, 12), "c.weight": (5, 7)}


def _family(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) * (1 + i) for k, v in base.items()} for i in range(n)]
    return base, experts


def _reference(base, experts, ratio, clamp_ratio, scale):
    """The reference's pcb_merging, written from its steps, on the task vectors flattened in tensor order."""
    names = list(SHAPES)
    flat = torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in names]) for e in experts])
    n, d = flat.shape

    def clamp(x, min_ratio, max_ratio):
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def normalize(x):
        lo, _ = torch.min(x, dim=1, keepdim=True)
        hi, _ = torch.max(x, dim=1, keepdim=True)
        return (x - lo) / (hi - lo)

    magnitude = clamp(flat.abs(), clamp_ratio, clamp_ratio)
    clamped = torch.sign(flat) * magnitude
    task_pcb = torch.exp(n * normalize(magnitude) ** 2) * torch.tanh(flat * flat.sum(0))
    weight = normalize(clamp(task_pcb, 1 - ratio, 0))
    merged = (clamped * weight).sum(0) / torch.clamp(weight.sum(0), min=1e-12)
    out, start = {}, 0
    for k in names:
        size = base[k].numel()
        out[k] = base[k] + scale * merged[start:start + size].reshape(base[k].shape)
        start += size
    return out


@pytest.mark.parametrize("ratio,clamp_ratio,n", [(0.1, 0.0001, 3), (0.3, 0.01, 2), (0.05, 0.0, 4), (1.0, 0.05, 3)])
def test_pcb_equals_the_reference_steps_on_the_flattened_model(ratio, clamp_ratio, n):
    base, experts = _family(n=n, seed=n)
    got = merge(experts, base, PCB(ratio=ratio, clamp_ratio=clamp_ratio, scale=0.7))
    want = _reference(base, experts, ratio, clamp_ratio, 0.7)
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_model_order_statistics_are_exact_for_signed_values_and_ties():
    g = torch.Generator().manual_seed(0)
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    values = [{k: torch.randn(s, generator=g).round(decimals=1) for k, s in SHAPES.items()} for _ in range(2)]
    values[1]["a.bias"][:] = -0.0  # signed zeros and many ties
    opened, base_expert = open_inputs([Expert(v) for v in values], Expert(base))
    plan = plan_merge(opened, base_expert, PCB())
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in SHAPES]) for v in values])
    d = flat.shape[1]
    ranks = [[0, 1, d // 2, d - 2, d - 1], [3, d // 3, d - 1, 0, 7]]
    got = model_order_statistics(plan, lambda name: plan.task_vectors(name).reshape(2, -1), ranks, "test")
    for i in range(2):
        ordered = torch.sort(flat[i]).values
        assert got[i] == [float(ordered[r]) for r in ranks[i]]


def test_declarations_arguments_and_round_trip():
    strategy = PCB(ratio=0.2, scale=0.5)
    assert strategy.scalable and strategy.global_pass and strategy.needs_base and not strategy.linear
    assert Strategy.from_dict(strategy.to_dict()) == strategy
    base, experts = _family()
    half, one = merge(experts, base, PCB(scale=0.5)), merge(experts, base, PCB(scale=1.0))
    for k in SHAPES:  # scalable: θ₀ + λ·τ*
        torch.testing.assert_close(half[k] - base[k], 0.5 * (one[k] - base[k]), rtol=1e-5, atol=1e-7)
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}, {"clamp_ratio": 0.5}, {"clamp_ratio": -0.1}):
        with pytest.raises(ValueError, match="PCB"):
            PCB(**bad)
    with pytest.raises(ValueError, match="needs a base"):
        merge(experts, None, PCB())


def test_a_recipe_names_it(tmp_path):
    from lightning_merge.files.safetensors import save_tensors
    from lightning_merge.tools.recipe import load_recipe

    base, experts = _family(n=2)
    save_tensors(tmp_path / "base.safetensors", base)
    for i, e in enumerate(experts):
        save_tensors(tmp_path / f"e{i}.safetensors", e)
    (tmp_path / "r.yaml").write_text("merge_method: pcb\nbase_model: base.safetensors\nparameters: {ratio: 0.2}\n"
                                     "models:\n  - model: e0.safetensors\n  - model: e1.safetensors\n")
    assert load_recipe(tmp_path / "r.yaml").strategy == PCB(ratio=0.2)
