"""ISO-C, ISO-CTS (isotropic merging) and WUDI: the rules on values, their sanity properties, and parity with
FusionBench 0.2.33's ``iso_c``, ``iso_cts`` and ``wudi_merging`` (run in its own environment when one is found)."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSION_BENCH, fusion_bench_runs, state_dicts

from lightning_merge import WUDI, ContinualState, IsoC, IsoCTS, merge
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.strategies import NoContinualForm, Strategy
from lightning_merge.strategies.isotropic import cts_split, iso_c, iso_cts
from lightning_merge.strategies.wudi import wudi_adam, wudi_exact
from lightning_merge.tools.evaluation import sweep_scale

SHAPES = {"layer.0.weight": (12, 9), "layer.0.bias": (12,), "head.weight": (4, 12)}


def _setup(n=3, seed=0, shapes=None):
    return state_dicts(shapes or SHAPES, n, seed)


def _taus(base, experts, name):
    return [(e[name] - base[name]).double() for e in experts]


def _polar(m):
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def test_iso_c_rule_on_values():
    """2-D: the sum's singular values all replaced by their mean, σ̄ U Vᵀ; other tensors (and not_svd) the mean;
    θ = θ₀ + scale·τ*."""
    base, experts = _setup()
    got = merge(experts, base, IsoC(scale=0.7, not_svd=r"^head\."))
    u, s, vh = torch.linalg.svd(sum(_taus(base, experts, "layer.0.weight")), full_matrices=False)
    want = s.mean() * u @ vh
    torch.testing.assert_close(got["layer.0.weight"], base["layer.0.weight"] + 0.7 * want.float(),
                               rtol=1e-5, atol=1e-6)
    for name in ("layer.0.bias", "head.weight"):
        mean = sum(_taus(base, experts, name)) / 3
        torch.testing.assert_close(got[name], base[name] + 0.7 * mean.float(), rtol=1e-5, atol=1e-6)


def test_iso_c_sanity_and_continual_form(tmp_path):
    """The merged matrix has one singular value, σ̄ = ‖Σ τ‖_* / r, and the sum's singular vectors. The continual
    form (Σ τ kept per tensor, the SVD when the model is written) gives the batch merge after each expert."""
    base, experts = _setup(n=3)
    total = sum(_taus(base, experts, "layer.0.weight")).float()
    merged = iso_c(total)
    s = torch.linalg.svdvals(merged)
    nuclear = torch.linalg.svdvals(total).sum()
    torch.testing.assert_close(s, torch.full_like(s, float(nuclear) / 9), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged @ merged.T @ total, (nuclear / 9) ** 2 * total, rtol=1e-4, atol=1e-5)
    save_tensors(tmp_path / "base.safetensors", base)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=IsoC(scale=0.8))
    for i, e in enumerate(experts):
        save_tensors(tmp_path / f"e{i}.safetensors", e)
        state.add(tmp_path / f"e{i}.safetensors")
        want = merge(experts[:i + 1], base, IsoC(scale=0.8))
        for name, value in state.state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6)
    result = sweep_scale(IsoC(), experts, base, score=lambda st: -float(st["layer.0.weight"].square().sum()),
                         scales=(0.5, 1.5))
    torch.testing.assert_close(result.state["layer.0.weight"],
                               merge(experts, base, IsoC(scale=result.scale))["layer.0.weight"])
    assert Strategy.from_dict(IsoC(not_svd="head").to_dict()) == IsoC(not_svd="head")
    with pytest.raises(ValueError, match="IsoC.not_svd"):
        IsoC(not_svd="(")
    with pytest.raises(ValueError, match="base"):
        merge(experts, None, IsoC())


@pytest.mark.parametrize("r, n, fraction, want", [
    (9, 3, 0.8, (6, 1)),     # k₀ = 7, round(2/3) = 1 → k = 6
    (12, 4, 0.8, (8, 1)),    # k₀ = 9, round(3/4) = 1: the common subspace gives a direction up, k = 8
    (10, 4, 0.0, (2, 2)),    # round(2.5) = 2 (halves to even, Python's round)
    (5, 3, 0.0, (2, 1)),     # round(5/3) = 2 would need 6 > 5 directions: cut to ⌊5/3⌋ = 1
    (64, 4, 1.0, (64, 0)),
])
def test_iso_cts_split_follows_the_references_rounding(r, n, fraction, want):
    assert cts_split(r, n, fraction) == want


def test_iso_cts_rule_on_values():
    """Common subspace: the sum's top k triplets; each task its top s triplets after removing the common left
    subspace; U and V replaced by polar factors; the spectrum flattened to the mean of the r gathered values."""
    base, experts = _setup(n=3, shapes={"w": (14, 10), "b": (14,)})
    got = merge(experts, base, IsoCTS(common_space_fraction=0.4, scale=1.2))
    taus = _taus(base, experts, "w")
    k, per = cts_split(10, 3, 0.4)
    assert (k, per) == (4, 2)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k]]
    for tau in taus:
        ui, si, vhi = torch.linalg.svd(tau - u[:, :k] @ u[:, :k].T @ tau, full_matrices=False)
        us.append(ui[:, :per])
        ss.append(si[:per])
        vs.append(vhi[:per])
    want = torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 0))
    torch.testing.assert_close(got["w"], base["w"] + 1.2 * want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["b"], base["b"] + 1.2 * (sum(_taus(base, experts, "b")) / 3).float())


def test_iso_cts_sanity():
    """f = 1 is ISO-C; one expert with f = 0 keeps its singular vectors with a flat spectrum; no continual form."""
    base, experts = _setup(n=3)
    taus = [t.float() for t in _taus(base, experts, "layer.0.weight")]
    torch.testing.assert_close(iso_cts(taus, 1.0), iso_c(sum(taus)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(iso_cts(taus[:1], 0.0), iso_c(taus[0]), rtol=1e-4, atol=1e-5)
    with pytest.raises(NoContinualForm):
        IsoCTS().continual_form()
    with pytest.raises(ValueError, match="IsoCTS.common_space_fraction"):
        IsoCTS(common_space_fraction=1.5)


@pytest.mark.slow  # 20,000 Adam steps
def test_wudi_solvers_and_sanity():
    """Adam from Σ τ: 0 steps is the sum; many large steps reach the closed-form optimum B A⁺, where ∇L = 0. Experts
    with orthogonal row spaces: the optimum is their sum. A zero task vector adds nothing. Non-2-D: the mean."""
    base, experts = _setup(n=3)
    taus = [t.float() for t in _taus(base, experts, "layer.0.weight")]
    torch.testing.assert_close(wudi_adam(taus, 0, 1e-5), sum(taus))
    exact = wudi_exact(taus).double()
    grad = sum(2 * (exact - t) @ t.T @ t / t.square().sum() for t in _taus(base, experts, "layer.0.weight"))
    assert float(grad.abs().max()) < 1e-4 * float(exact.abs().max())
    torch.testing.assert_close(wudi_adam(taus, 20000, 1e-3), exact.float(), rtol=0, atol=1e-3)
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    parts = [torch.randn(6, 3, generator=g) @ q[:, 3 * i:3 * i + 3].T for i in range(3)]
    torch.testing.assert_close(wudi_exact(parts), sum(parts), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wudi_exact([*parts, torch.zeros(6, 9)]), sum(parts), rtol=1e-4, atol=1e-5)
    got = merge(experts, base, WUDI(scale=0.5, iterations=5))
    torch.testing.assert_close(got["layer.0.bias"],
                               base["layer.0.bias"] + 0.5 * (sum(_taus(base, experts, "layer.0.bias")) / 3).float())
    torch.testing.assert_close(got["layer.0.weight"],
                               base["layer.0.weight"] + 0.5 * wudi_adam([e["layer.0.weight"] - base["layer.0.weight"]
                                                                         for e in experts], 5, 1e-5))
    with pytest.raises(NoContinualForm, match="in × in"):
        WUDI().continual_form()
    for bad in (dict(iterations=-1), dict(iterations=1.5), dict(solver="lbfgs"), dict(lr=-1.0), dict(device="gpu0")):
        with pytest.raises(ValueError, match="WUDI."):
            WUDI(**bad)
    torch.testing.assert_close(merge(experts, base, WUDI(iterations=5, device="cpu"))["layer.0.weight"],
                               merge(experts, base, WUDI(iterations=5))["layer.0.weight"], rtol=1e-5, atol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            merge(experts, base, WUDI(device="cuda"))


REFERENCE = """
import sys, torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.wudi.wudi import wudi_merging
for source, target in zip(sys.argv[1::2], sys.argv[2::2]):  # every input in one process (fusion_bench imports slowly)
    d = torch.load(source, weights_only=True)
    taus, exclude = d["taus"], ["head.weight"]
    out = {"iso_c": iso_c(taus, accelerator="cpu", exclude_keys=exclude)}
    for f in (0.8, 0.5):
        out[f"iso_cts {f}"] = iso_cts(taus, common_space_fraction=f, accelerator="cpu", exclude_keys=exclude)
    for steps in (300, 400):
        merged = wudi_merging(taus, accelerator="cpu", iter_num=steps, exclude_keys=exclude)
        out[f"wudi {steps}"] = {k: v.detach() for k, v in merged.items()}
    torch.save(out, target)
"""


@pytest.fixture(scope="module")
def fusionbench_merges(tmp_path_factory):
    """Three sets of experts and FusionBench's merges of each: {n: (base, experts, reference outputs)}."""
    folder = tmp_path_factory.mktemp("fusionbench")
    inputs, args = {}, []
    for n in (2, 3, 4):
        base, experts = _setup(n=n, seed=n, shapes={"layer.0.weight": (20, 14), "layer.1.weight": (10, 30),
                                                     "layer.0.bias": (20,), "head.weight": (5, 10)})
        taus = [{k: e[k] - base[k] for k in base} for e in experts]
        torch.save({"taus": taus}, folder / f"in{n}.pt")
        inputs[n] = (base, experts)
        args += [str(folder / f"in{n}.pt"), str(folder / f"out{n}.pt")]
    fusion_bench_runs(REFERENCE, [args], folder)
    return {n: (*inputs[n], torch.load(folder / f"out{n}.pt", weights_only=True)) for n in inputs}


def _relative(ours, base, reference):
    """The largest |ours − base − reference| over a tensor's entries, relative to its largest |reference|."""
    return max(float((ours[k] - base[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("key, strategy", [
    ("iso_c", IsoC(not_svd=r"^head\.weight$")),
    ("iso_cts 0.8", IsoCTS(not_svd=r"^head\.weight$")),
    ("iso_cts 0.5", IsoCTS(common_space_fraction=0.5, not_svd=r"^head\.weight$")),
    ("wudi 300", WUDI(not_svd=r"^head\.weight$")),
    ("wudi 400", WUDI(iterations=400, not_svd=r"^head\.weight$")),
])
def test_matches_fusionbench(fusionbench_merges, n, key, strategy):
    base, experts, reference = fusionbench_merges[n]
    worst = _relative(merge(experts, base, strategy), base, reference[key])
    assert worst < 1e-5, worst


def test_an_svd_that_fails_to_converge_in_float32_is_retried_in_float64(monkeypatch):
    """LAPACK's gesdd can fail to converge in float32 on gathered low-rank singular vectors (ISO-CTS on MiniLM LoRA
    experts did): thin_svd retries in float64, so ISO-CTS, ISO-C, TSV-M, DOGE-TA, DOP and OPCM merge instead of
    stopping. Where it converges the factors are torch's own, bit for bit."""
    from lightning_merge.strategies.functional import thin_svd

    m = torch.randn(12, 7, generator=torch.Generator().manual_seed(3))
    for got, want in zip(thin_svd(m), torch.linalg.svd(m, full_matrices=False)):
        assert torch.equal(got, want)
    base, experts = _setup(n=3, seed=4)
    expected = merge(experts, base, IsoCTS())
    real = torch.linalg.svd
    calls = {"float32": 0, "float64": 0}

    def fails_in_float32(a, full_matrices=True):
        calls[str(a.dtype).split(".")[1]] += 1
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    u, s, vh = thin_svd(m)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(u * s @ vh, m, rtol=1e-5, atol=1e-5)
    got = merge(experts, base, IsoCTS())
    assert calls["float32"] > 1 and calls["float64"] == calls["float32"]  # the merge's SVDs, each one retried
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):  # float64 failing too is not hidden
        monkeypatch.setattr(torch.linalg, "svd", lambda a, full_matrices=True: (_ for _ in ()).throw(
            torch.linalg.LinAlgError("no convergence")))
        thin_svd(m)
