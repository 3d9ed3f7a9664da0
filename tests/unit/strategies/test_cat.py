"""CAT Merging from captured input Gram matrices: its rules on hand-made values, the equations recomputed in numpy on
random layers, its sanity properties (one expert, orthogonal features, a common Gram scale, norm preservation) and
its refusals. The comparison with the authors' rules (transcribed outside the repository) is in docs/strategies.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_merge import CATMerging, ContinualState, Expert, StatisticsError, merge
from lightning_merge.continual.state import ContinualError
from lightning_merge.formats.sidecar import Statistics
from lightning_merge.strategies import NoContinualForm, Strategy
from lightning_merge.strategies.cat import trim_linear, trim_shift


def _experts(experts, grams, count=1):
    """Experts holding ``grams`` (weight name → Σ xxᵀ) as their sidecar, ``count`` rows each."""
    return [Expert(e, statistics=Statistics({f"gram/{k}": g for k, g in gs.items()}, {"gram": {"count": count}}, "t"))
            for e, gs in zip(experts, grams)]


def test_linear_and_bias_rules_on_hand_made_values():
    """Two tasks on a (3, 2) weight. τ₂ reads both inputs, task 1's inputs are strong on input 0: G₁ = τ₂(S₁ − λS₂)τ₂ᵀ
    = diag(4 − 0.5, −0.5, 0), so output row 0 of τ₂ is removed and τ₂ rescaled to its norm √2. τ₁ = [[0,0],[0,0],
    [1,1]]: G₂ = τ₁(S₂ − λS₁)τ₁ᵀ has the single entry 0.2 − 20 < 0, no positive eigenvalue: τ₁ is kept. On a bias,
    ratio_bias = 1 zeroes in the other task the entries at or above the 5th smallest τᵢ² of six (two entries)."""
    base = {"w": torch.zeros(3, 2), "b": torch.zeros(6), "norm.weight": torch.zeros(2)}
    t1 = {"w": torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([0.1, -3.0, 0.5, 2.0, 0.2, 0.0]),
          "norm.weight": torch.tensor([1.0, -1.0])}
    t2 = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
          "norm.weight": torch.tensor([2.0, 2.0])}
    grams = [{"w": torch.diag(torch.tensor([4.0, 0.0]))}, {"w": torch.diag(torch.tensor([0.1, 0.1]))}]
    got = merge(_experts([t1, t2], grams), base, CATMerging(scale=0.5, lambd=5.0, ratio=1, ratio_bias=1))
    want_w = t1["w"] + torch.tensor([[0.0, 0.0], [0.0, math.sqrt(2.0)], [0.0, 0.0]])
    torch.testing.assert_close(got["w"], 0.5 * want_w)
    b1 = torch.tensor([0.1, -3.0, 0.5, 2.0, 0.0, 0.0])  # τ₂² ≥ 25 at entries 4 and 5
    b2 = torch.tensor([1.0, 0.0, 3.0, 0.0, 5.0, 6.0])   # τ₁² ≥ 4 at entries 1 and 3
    torch.testing.assert_close(got["b"], 0.5 * (b1 + b2))
    torch.testing.assert_close(got["norm.weight"], 0.5 * (t1["norm.weight"] + t2["norm.weight"]))  # a norm scale
    # a fraction: the 5th smallest of ⌊6 (1 − 0.25)⌋ = 4 → entries with τ² ≥ the 4th smallest (three) go
    shifted = trim_shift([t1["b"], t2["b"]], 0.25)
    torch.testing.assert_close(shifted[1], torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 6.0]))
    torch.testing.assert_close(shifted[0], torch.tensor([0.1, -3.0, 0.5, 0.0, 0.0, 0.0]))


def _numpy_cat(taus, grams, lambd, ratio):
    """The linear rule of the paper's objective written again in numpy (float64): for each task i the eigenvectors of
    Gᵢ = Σⱼ≠ᵢ τⱼ(Sᵢ − λSⱼ)τⱼᵀ sorted by eigenvalue, the count by the ratio rule, then every other task's vector
    projected off in task order with its norm restored."""
    t = [tau.double().numpy() for tau in taus]
    s = [g.double().numpy() for g in grams]
    n = len(t)
    bases = []
    for i in range(n):
        g = sum(t[j] @ (s[i] - lambd * s[j]) @ t[j].T for j in range(n) if j != i)
        values, vectors = np.linalg.eigh((g + g.T) / 2)
        order = np.argsort(-values)
        values, vectors = values[order], vectors[:, order]
        if not (values > 0).any():
            bases.append(None)
            continue
        if ratio == -1:
            bases.append(vectors[:, values > 0])
        elif ratio >= 1:
            bases.append(vectors[:, : int(ratio)])
        else:
            p = values[values > 0] ** 2
            bases.append(vectors[:, : int((np.cumsum(p / p.sum()) < ratio).sum())])
    out = []
    for j in range(n):
        v = t[j]
        for i in range(n):
            if i != j and bases[i] is not None and bases[i].shape[1]:
                kept = v - bases[i] @ bases[i].T @ v
                if np.linalg.norm(kept) > 0:
                    v = kept * np.linalg.norm(v) / np.linalg.norm(kept)
        out.append(v)
    return out


@pytest.mark.parametrize("ratio", [4, 1, 0.6, -1])
@pytest.mark.parametrize("n", [2, 3])
def test_linear_rule_matches_the_equations(ratio, n):
    """merge() on random layers equals θ₀ + λ Σ τ̃ⱼ with τ̃ from the numpy rule above, for every ratio form; the
    Grams are given as sums over 10 rows (the sidecar's count), which the rule reads as means."""
    g = torch.Generator().manual_seed(n)
    base = {"l0.weight": torch.randn(9, 6, generator=g), "l1.weight": torch.randn(5, 9, generator=g)}
    experts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    inputs = [{k: torch.randn(10, v.shape[1], generator=g) * (1 + i) for k, v in base.items()} for i in range(n)]
    grams = [{k: x.T @ x for k, x in xs.items()} for xs in inputs]
    got = merge(_experts(experts, grams, count=10), base, CATMerging(scale=0.7, lambd=2.0, ratio=ratio))
    for k in base:
        taus = [e[k] - base[k] for e in experts]
        trimmed = _numpy_cat(taus, [gs[k] for gs in grams], 2.0, ratio)
        want = base[k].double().numpy() + 0.7 * sum(trimmed)
        np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-5, atol=1e-5)
        if ratio == 4:
            assert not torch.allclose(got[k], base[k] + 0.7 * sum(taus), atol=1e-3)  # something was trimmed


def test_sanity_properties():
    """One expert is task arithmetic (nothing to conflict with); tasks whose task vectors read only their own
    inputs (orthogonal features) trim nothing; scaling every Gram by one constant changes nothing (sums or means of
    equally many rows give one merge); each trimmed linear task vector keeps its norm; ratio = ratio_bias = 0 is
    task arithmetic."""
    g = torch.Generator().manual_seed(0)
    base = {"l.weight": torch.randn(6, 4, generator=g), "l.bias": torch.randn(6, generator=g)}
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    grams = [{"l.weight": (x := torch.randn(8, 4, generator=g)).T @ x} for _ in range(2)]

    def task_arithmetic(chosen, scale):
        return {k: base[k] + scale * sum(e[k] - base[k] for e in chosen) for k in base}

    one = merge(_experts(experts[:1], grams[:1]), base, CATMerging(scale=0.9))
    for k in base:
        torch.testing.assert_close(one[k], task_arithmetic(experts[:1], 0.9)[k])
    off = merge(_experts(experts, grams), base, CATMerging(ratio=0, ratio_bias=0))
    for k in base:
        torch.testing.assert_close(off[k], task_arithmetic(experts, 0.4)[k])
    # orthogonal features: task 0 sees inputs 0-1 only and changes only those columns; task 1 inputs 2-3
    split = [dict(e) for e in experts]
    split[0]["l.weight"] = base["l.weight"].clone()
    split[0]["l.weight"][:, :2] += 1.0
    split[1]["l.weight"] = base["l.weight"].clone()
    split[1]["l.weight"][:, 2:] -= 0.7
    own = [{"l.weight": torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0]))},
           {"l.weight": torch.diag(torch.tensor([0.0, 0.0, 3.0, 1.0]))}]
    got = merge(_experts(split, own), base, CATMerging(ratio=-1, ratio_bias=0))
    torch.testing.assert_close(got["l.weight"], task_arithmetic(split, 0.4)["l.weight"])
    a = merge(_experts(experts, grams), base, CATMerging())
    b = merge(_experts(experts, [{k: 37.0 * v for k, v in gs.items()} for gs in grams]), base, CATMerging())
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    taus = [e["l.weight"] - base["l.weight"] for e in experts]
    for before, after in zip(taus, trim_linear(taus, [gs["l.weight"] for gs in grams], 0.5, 2)):
        assert not torch.allclose(before, after)
        torch.testing.assert_close(torch.linalg.vector_norm(after), torch.linalg.vector_norm(before))


def test_missing_grams_and_refusals(tmp_path):
    """A weight no expert has a Gram matrix of (an embedding, an uncaptured head) keeps its task vectors; with
    on_missing_statistic="uniform" an expert lacking one is read as isotropic inputs of the others' mean energy (as
    RegMean does); experts without gram statistics, bad arguments and a continual state are refused."""
    g = torch.Generator().manual_seed(1)
    base = {"l.weight": torch.randn(5, 3, generator=g), "head.weight": torch.randn(2, 5, generator=g)}
    experts = [{k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    grams = [{"l.weight": (x := torch.randn(6, 3, generator=g)).T @ x} for _ in range(3)]
    got = merge(_experts(experts, grams), base, CATMerging())
    torch.testing.assert_close(got["head.weight"],
                               base["head.weight"] + 0.4 * sum(e["head.weight"] - base["head.weight"] for e in experts))
    level = float(torch.stack([gs["l.weight"].diagonal().mean() for gs in grams[1:]]).mean())
    lacking = [{}, *grams[1:]]
    got = merge(_experts(experts, lacking), base, CATMerging(), on_missing_statistic="uniform")
    taus = trim_linear([e["l.weight"] - base["l.weight"] for e in experts],
                       [torch.eye(3) * level, grams[1]["l.weight"], grams[2]["l.weight"]], 5.0, 4)
    torch.testing.assert_close(got["l.weight"], base["l.weight"] + 0.4 * sum(taus))
    with pytest.raises(StatisticsError, match="no 'gram' statistics"):
        merge(experts, base, CATMerging())
    with pytest.raises(ValueError, match="needs a base model"):
        merge(_experts(experts, grams), None, CATMerging())
    for bad in (dict(ratio=2.5), dict(ratio=-0.5), dict(ratio_bias=1.5), dict(lambd=-1.0), dict(norm_pattern="(")):
        with pytest.raises(ValueError):
            CATMerging(**bad)
    assert Strategy.from_dict(CATMerging(ratio=0.3, lambd=2.0).to_dict()) == CATMerging(ratio=0.3, lambd=2.0)
    with pytest.raises(NoContinualForm, match="trimmed against every other task"):
        CATMerging().continual_form()
    with pytest.raises(ContinualError):
        ContinualState.create(tmp_path / "state", base=base, strategy=CATMerging())


def test_norm_scales_are_kept_and_named_by_pattern():
    """1-D tensors matched by norm_pattern keep their task vectors (the reference's LayerNorm masking needs
    statistics the capture does not record); others get the bias rule; None makes every 1-D tensor a bias."""
    strategy = CATMerging()
    for name in ("norm.weight", "layers.0.input_layernorm.weight", "blocks.3.ln_1.weight", "transformer.ln_f.weight",
                 "encoder.LayerNorm.weight"):
        assert strategy.is_norm_scale(name), name
    for name in ("layers.0.bias", "blocks.3.ln_1.bias", "kiln.weight", "head.bias"):
        assert not strategy.is_norm_scale(name), name
    assert not CATMerging(norm_pattern=None).is_norm_scale("norm.weight")


def test_adapters_merge_with_a_full_fine_tune_whose_embedding_has_no_gram(tmp_path):
    """A LoRA adapter reads as a zero Gram matrix wherever it leaves a tensor unchanged (it does not pull the layer),
    the embedding included. A full fine-tune captured by CurvatureCapture has Gram matrices of its linear layers only:
    its embedding has none. Where every expert that has a Gram matrix has such a zero one, nothing is known of the
    tensor's inputs: it merges as a tensor no expert has a Gram matrix of (CAT: task arithmetic; RegMean: the mean),
    instead of the merge failing on 'model.embed_tokens.weight' as if the adapters had captured one."""
    from conftest import write_lora_family
    from safetensors.torch import load_file

    from lightning_merge import RegMean
    from lightning_merge.formats.sidecar import write_statistics

    def grams(folder, g):  # lora_A's input Gram matrices, as CurvatureCapture(gram=...) stores them
        factors = load_file(str(folder / "adapter_model.safetensors"))
        write_statistics(folder / "statistics.safetensors",
                         {"gram": {k: (x := torch.randn(8, v.shape[1], generator=g)).T @ x
                                   for k, v in factors.items() if "lora_A" in k}}, {"gram": {"count": 8}})

    base_path, adapters = write_lora_family(tmp_path, n=2, each=grams)
    base = Expert(base_path)
    g = torch.Generator().manual_seed(4)
    full = {n: base.tensor(n).float() + 0.05 * torch.randn(base.spec(n).shape, generator=g) for n in base.names()}
    linear = {n: (x := torch.randn(8, v.shape[1], generator=g)).T @ x for n, v in full.items()
              if v.dim() == 2 and "embed_tokens" not in n}
    captured = Expert(full, statistics=Statistics({f"gram/{k}": v for k, v in linear.items()}, {"gram": {"count": 8}},
                                                  "t"))
    embed = "model.embed_tokens.weight"
    for strategy, coefficient in ((CATMerging(), 0.4), (RegMean(), 1 / 3)):
        got = merge([captured, *adapters], base_path, strategy)
        want = base.tensor(embed).float() + coefficient * (full[embed] - base.tensor(embed).float())
        torch.testing.assert_close(got[embed], want, rtol=1e-5, atol=1e-6)


def test_experts_without_grams_are_refused_naming_the_strategy_and_what_to_capture(tmp_path):
    """No Gram matrices: the error says which strategy needs them and how to capture them (CurvatureCapture records
    none by default), in a merge and in a fit whose CurvatureCapture does not record them."""
    base, experts = {"l.weight": torch.ones(2, 3)}, [{"l.weight": torch.full((2, 3), v)} for v in (0.5, 2.0)]
    with pytest.raises(StatisticsError, match=r"which cat_merging needs; capture them with CurvatureCapture\(gram="):
        merge(experts, base, CATMerging())
    from lightning_merge.callbacks import CurvatureCapture
    from lightning_merge.callbacks._checks import check_statistics

    class Trainer:
        callbacks = [CurvatureCapture(dirpath=str(tmp_path))]

    grams = _experts(experts, [{"l.weight": torch.eye(3)}] * 2)
    with pytest.raises(ValueError, match=r"gram= for Gram matrices \(RegMean, CAT Merging\)"):
        check_statistics("MergeOnFitEnd", CATMerging(), grams, Trainer(), "error")


def test_no_conflict_matrix_is_formed_from_task_vectors_that_are_zero(monkeypatch):
    """Adapters read as zero task vectors (with zero Gram matrices) on every tensor they leave unchanged, the
    vocabulary-sized embedding and LM head of a causal LM included, where Gᵢ is (vocab × vocab): 131 GB in float64
    for a 128k vocabulary. A task vector of zeros adds nothing to any Gᵢ, so no Gᵢ is formed or decomposed from zeros
    alone: a tensor no expert changed is the base without an eigendecomposition, and the others merge as before."""
    import lightning_merge.strategies.cat as cat

    g = torch.Generator().manual_seed(6)
    base = torch.randn(6, 4, generator=g)
    grams = [(x := torch.randn(8, 4, generator=g)).T @ x for _ in range(3)]
    tau = torch.randn(6, 4, generator=g)
    want = trim_linear([tau, torch.zeros(6, 4), torch.zeros(6, 4)], grams, 0.5, 2)
    calls = []
    eigh = torch.linalg.eigh

    def counted(matrix):
        calls.append(tuple(matrix.shape))
        return eigh(matrix)

    monkeypatch.setattr(cat.torch.linalg, "eigh", counted)
    merged = CATMerging().merge_tensor("lm_head.weight", base, [base, base, base], [{"gram": s} for s in grams])
    assert torch.equal(merged, base) and calls == []
    got = trim_linear([tau, torch.zeros(6, 4), torch.zeros(6, 4)], grams, 0.5, 2)
    assert len(calls) == 2  # G₁ and G₂ read τ₀; G₀ would read only the zero τ₁ and τ₂
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _permuted_eigh(seed):
    """Another valid eigendecomposition of a symmetric matrix: LAPACK's of P G Pᵀ, mapped back (a different basis
    of every repeated eigenvalue's space, as another machine may return)."""
    g = torch.Generator().manual_seed(seed)
    inner = torch.linalg.eigh

    def eigh(m):
        order = torch.randperm(m.shape[0], generator=g)
        values, vectors = inner(m[order][:, order])
        out = torch.empty_like(vectors)
        out[order] = vectors
        return values, out

    return eigh


@pytest.mark.parametrize("lambd,ratio", [(0.0, -1), (0.0, 30), (5.0, 30), (5.0, 4), (0.5, 0.5)])
def test_low_rank_task_vectors_trim_the_same_whichever_eigenbasis_the_machine_returns(lambd, ratio, monkeypatch):
    """Rank-3 task vectors of a 24-wide layer: the conflict matrices are rank-deficient, their null-space
    eigenvectors LAPACK's free choice. The removal basis takes none of them (eigenvalues within rounding of zero
    are not positive, and an integer ratio does not cut into them), and a projection that leaves only rounding is
    skipped rather than blown up to the vector's norm: the trim is the same under another valid eigh."""
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g) for _ in range(3)]
    grams = []
    for _ in range(3):
        x = torch.randn(64, 16, generator=g)
        grams.append(x.T @ x / 64)
    here = trim_linear(taus, grams, lambd, ratio)
    for seed in range(3):
        monkeypatch.setattr(torch.linalg, "eigh", _permuted_eigh(seed))
        there = trim_linear(taus, grams, lambd, ratio)
        monkeypatch.undo()
        for a, b in zip(there, here):
            assert float((a - b).norm() / b.norm()) < 1e-5, (lambd, ratio, seed)
    if lambd == 0.0 and ratio == -1:  # every other task's directions removed: nothing left, so nothing trimmed
        for a, b in zip(here, taus):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ratio_of_update", [1e-2, 2e-4])
def test_small_adapter_updates_removed_whole_leave_the_vectors_alone_on_every_machine(ratio_of_update, monkeypatch):
    """Adapters read as θ₀ + ΔW in float32 carry rounding of θ₀'s size in their task vectors. With lambd 0 and
    ratio −1 every other task's directions are removed, so what a projection leaves is that rounding: it is compared
    with the weights' rounding noise (functional.rounding_noise) and skipped, not rescaled to ‖τⱼ‖ (a probe measured
    1.4 relative off the exact-ΔW trim, and 9–39 % between eighs, when only ε‖τⱼ‖ was counted)."""
    from lightning_merge.strategies.functional import rounding_noise

    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 16, generator=g) * 0.05
    weights = []
    for _ in range(3):
        delta = torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)
        weights.append(base + delta * (ratio_of_update * float(base.norm() / delta.norm())))
    taus = [w - base for w in weights]
    grams = []
    for _ in range(3):
        x = torch.randn(64, 16, generator=g)
        grams.append(x.T @ x / 64)
    floors = [rounding_noise(w) for w in weights]
    here = trim_linear(taus, grams, 0.0, -1, floors)
    for a, b in zip(here, taus):
        torch.testing.assert_close(a, b)
    for seed in range(3):
        monkeypatch.setattr(torch.linalg, "eigh", _permuted_eigh(seed))
        there = trim_linear(taus, grams, 0.0, -1, floors)
        monkeypatch.undo()
        for a, b in zip(there, here):
            assert float((a - b).norm() / b.norm()) < 1e-5
