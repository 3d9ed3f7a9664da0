"""WIDEN: the rule on hand-made tensors against the equations written out with plain loops, its sanity properties
(one expert, identical experts, the order of the experts, the scale, the embeddings' transposition) and its
declarations. Against the authors' code (yule-BUAA/MergeLLM's ``widen_merging``, run on random tiny Llama-named
models): bit-identical on every tensor, docs/strategies.md says how it was checked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import state_dicts

from lightning_merge import WIDEN, merge
from lightning_merge.strategies import NoContinualForm, Strategy
from lightning_merge.strategies.registry import reference
from lightning_merge.strategies.widen import column_changes, within_expert_ranks

BASE = [[0.5, -1.0, 2.0, 0.0],
        [1.5, 0.3, -0.7, 1.0],
        [-0.2, 0.8, 0.4, -2.0]]
EXPERTS = [
    [[0.7, -1.1, 2.0, 0.3], [1.2, 0.9, -0.6, 1.1], [-0.1, 0.8, 0.9, -1.5]],
    [[0.4, -0.2, 1.1, 0.1], [1.6, 0.2, -0.9, 2.0], [-0.9, 1.5, 0.3, -2.2]],
    [[0.5, -1.3, 2.6, -0.4], [1.9, 0.1, -0.2, 0.9], [-0.2, 0.5, 0.5, -2.1]],
]
VECTOR_BASE = [0.1, -0.4, 1.2, 0.0, 0.7]
VECTOR_EXPERTS = [[0.3, -0.4, 1.0, 0.2, 0.6], [0.0, 0.5, 1.3, -0.1, 0.7], [0.2, -0.9, 1.25, 0.0, 1.5]]


def _loops_columns(base, experts):
    """Per expert, the lists ΔM[j] and ΔD[j] over the columns of row-major nested lists (out × in), by loops."""
    rows, cols = len(base), len(base[0])
    out = []
    for w in experts:
        dm, dd = [], []
        for j in range(cols):
            b = [base[r][j] for r in range(rows)]
            e = [w[r][j] for r in range(rows)]
            nb = math.sqrt(sum(x * x for x in b))
            ne = math.sqrt(sum(x * x for x in e))
            dm.append(abs(ne - nb))
            dd.append(1.0 - sum(x * y for x, y in zip(b, e)) / (nb * ne))
        out.append((dm, dd))
    return out


def _loops_ranks(values):
    """rank/len: the k-th smallest (ties in index order) scores k / len."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    ranks = [0.0] * len(values)
    for k, j in enumerate(order):
        ranks[j] = k / len(values)
    return ranks


def _loops_scores(per_expert, ratio, calibration):
    """Softmax over experts of each position's scores, calibrated where a score exceeds ratio × its expert's mean."""
    n, size = len(per_expert), len(per_expert[0])
    means = [sum(s) / size for s in per_expert]
    weights = [[0.0] * size for _ in range(n)]
    for j in range(size):
        z = sum(math.exp(per_expert[i][j]) for i in range(n))
        for i in range(n):
            weights[i][j] = calibration if per_expert[i][j] > ratio * means[i] else math.exp(per_expert[i][j]) / z
    return weights


def _loops_matrix(base, experts, ratio, calibration, scale):
    changes = _loops_columns(base, experts)
    magnitude = _loops_scores([_loops_ranks(dm) for dm, _ in changes], ratio, calibration)
    direction = _loops_scores([_loops_ranks(dd) for _, dd in changes], ratio, calibration)
    merged = [row[:] for row in base]
    for r in range(len(base)):
        for j in range(len(base[0])):
            step = sum(0.5 * (magnitude[i][j] + direction[i][j]) * (experts[i][r][j] - base[r][j])
                       for i in range(len(experts)))
            merged[r][j] = base[r][j] + scale * step
    return merged


def _loops_vector(base, experts, ratio, calibration, scale):
    diffs = [[abs(e[k] - base[k]) for k in range(len(base))] for e in experts]
    weights = _loops_scores(diffs, ratio, calibration)
    return [base[k] + scale * sum(weights[i][k] * (experts[i][k] - base[k]) for i in range(len(experts)))
            for k in range(len(base))]


def _transposed(m):
    return [list(col) for col in zip(*m)]


@pytest.mark.parametrize(("ratio", "calibration", "scale"), [(1.0, 1.0, 1.0), (0.8, 0.4, 0.7), (1.4, 2.0, 1.3)])
def test_the_rule_on_hand_made_tensors_equals_the_equations_written_out(ratio, calibration, scale):
    """A linear weight (columns: input features), token embeddings (rows: tokens, transposed first) and a vector
    (scored on |τ| entry by entry), each against the equations computed with loops in float64."""
    embed_base, embed_experts = _transposed(BASE), [_transposed(e) for e in EXPERTS]
    base = {"layers.0.weight": torch.tensor(BASE), "model.embed_tokens.weight": torch.tensor(embed_base),
            "layers.0.bias": torch.tensor(VECTOR_BASE)}
    experts = [{"layers.0.weight": torch.tensor(e), "model.embed_tokens.weight": torch.tensor(t),
                "layers.0.bias": torch.tensor(v)} for e, t, v in zip(EXPERTS, embed_experts, VECTOR_EXPERTS)]
    got = merge(experts, base, WIDEN(above_average_value_ratio=ratio, score_calibration_value=calibration,
                                     scale=scale))
    want = {
        "layers.0.weight": _loops_matrix(BASE, EXPERTS, ratio, calibration, scale),
        "model.embed_tokens.weight": _transposed(_loops_matrix(BASE, EXPERTS, ratio, calibration, scale)),
        "layers.0.bias": _loops_vector(VECTOR_BASE, VECTOR_EXPERTS, ratio, calibration, scale),
    }
    for name, value in want.items():
        torch.testing.assert_close(got[name], torch.tensor(value), rtol=1e-6, atol=1e-6, msg=name)
    # the case is not degenerate: some scores calibrated, some not, and the merge is not task arithmetic
    ranks = [_loops_ranks(dm) for dm, _ in _loops_columns(BASE, EXPERTS)]
    flags = {r > ratio * sum(row) / len(row) for row in ranks for r in row}
    assert flags == {True, False}
    summed = torch.tensor(BASE) + scale * sum(torch.tensor(e) - torch.tensor(BASE) for e in EXPERTS)
    assert (got["layers.0.weight"] - summed).abs().max() > 0.05


def test_ranks_are_stable_and_a_column_without_direction_ranks_last():
    """Equal changes rank in column order; a column of norm 0 in the base or the expert has ΔD = +inf (the
    reference's NaN, which its sort puts last)."""
    ranks = within_expert_ranks(torch.tensor([[0.5, 0.1, 0.5, 0.1], [3.0, 2.0, 1.0, 0.0]]))
    assert torch.equal(ranks, torch.tensor([[0.5, 0.0, 0.75, 0.25], [0.75, 0.5, 0.25, 0.0]]))
    base = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.5]])
    weight = torch.tensor([[1.1, 0.3, 0.0], [0.9, 0.1, 0.0]])
    magnitude, direction = column_changes(weight, base)
    torch.testing.assert_close(magnitude, torch.tensor([abs(math.hypot(1.1, 0.9) - math.sqrt(2)),
                                                        math.hypot(0.3, 0.1), math.hypot(2.0, 0.5)]))
    assert math.isfinite(direction[0]) and direction[1] == direction[2] == math.inf
    merged = WIDEN().merge_tensor("w", base, [weight, base + 0.1], [{}] * 2)
    assert torch.isfinite(merged).all()


def test_one_expert_identical_experts_and_their_order():
    """One expert: the softmax over one expert is 1 and the calibration (1 by default) too, so the merge is the
    expert. N identical experts with the calibration off (ratio ≥ 2 for ranks; large for |τ|) share the change
    equally: the merge is the expert, as with ``score_calibration_value = 1/N``. Permuting the experts permutes the
    softmax's terms only."""
    shapes = {"w": (7, 5), "model.embed_tokens.weight": (9, 4), "b": (7,)}
    base, experts = state_dicts(shapes, n=3, seed=1)
    one = merge(experts[:1], base, WIDEN())
    for name in shapes:
        torch.testing.assert_close(one[name], experts[0][name], rtol=0, atol=1e-6)
    copies = [experts[1]] * 3
    for strategy in (WIDEN(above_average_value_ratio=1e6), WIDEN(score_calibration_value=1 / 3)):
        got = merge(copies, base, strategy)
        for name in shapes:
            torch.testing.assert_close(got[name], experts[1][name], rtol=0, atol=1e-6)
    forward = merge(experts, base, WIDEN(above_average_value_ratio=0.9, score_calibration_value=0.6))
    backward = merge(experts[::-1], base, WIDEN(above_average_value_ratio=0.9, score_calibration_value=0.6))
    for name in shapes:
        torch.testing.assert_close(backward[name], forward[name], rtol=0, atol=1e-6)


def test_scale_embeddings_and_declarations():
    """θ₀ + λ·τ*; an ``embeddings`` tensor is the rule on its transpose; the declarations and argument checks."""
    base, experts = state_dicts({"w": (6, 4), "tok.wte": (5, 6)}, n=3, seed=2)
    plain = merge(experts, base, WIDEN())
    scaled = merge(experts, base, WIDEN(scale=0.4))
    torch.testing.assert_close(scaled["w"], base["w"] + 0.4 * (plain["w"] - base["w"]), rtol=1e-6, atol=1e-6)
    assert not torch.equal(plain["tok.wte"], merge(experts, base, WIDEN(embeddings="wte"))["tok.wte"])
    transposed = WIDEN().merge_tensor("other", base["tok.wte"].T, [e["tok.wte"].T for e in experts], [{}] * 3)
    assert torch.equal(merge(experts, base, WIDEN(embeddings=r"\.wte$"))["tok.wte"], transposed.T)
    strategy = WIDEN(above_average_value_ratio=1.5, score_calibration_value=0.5, scale=0.9, embeddings=None)
    assert Strategy.from_dict(strategy.to_dict()) == strategy and strategy.to_dict()["name"] == "widen"
    assert strategy.scalable and not strategy.linear and strategy.needs_base and not strategy.row_local
    assert "2408.03092" in reference("widen").paper
    with pytest.raises(NoContinualForm, match="WIDEN"):
        WIDEN().continual_form()
    for bad in ({"above_average_value_ratio": "1"}, {"score_calibration_value": float("nan")}, {"scale": True},
                {"embeddings": "("}):
        with pytest.raises(ValueError, match=f"WIDEN.{next(iter(bad))}"):
            WIDEN(**bad)
    with pytest.raises(ValueError, match="needs a base"):
        merge(experts, None, WIDEN())
