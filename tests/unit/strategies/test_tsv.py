"""TSV-M (task singular vectors): the rule on values, its sanity properties, and parity with FusionBench's
``compute_and_sum_svd_mem_reduction`` (run in its own environment when one is found)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from lightning_merge import TSVMerge, merge
from lightning_merge.strategies import Strategy
from lightning_merge.strategies.tsv import task_singular_vectors
from lightning_merge.tools.evaluation import sweep_scale

CANDIDATES = [os.environ.get("FUSION_BENCH_PYTHON"), str(ROOT / ".venv-fusionbench" / "bin" / "python")]
FUSION_BENCH = next((c for c in CANDIDATES if c and Path(c).exists()), None)


def _setup(n=3, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layer.0.weight": (12, 9), "layer.0.bias": (12,), "head.weight": (4, 12)}
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, experts


def test_tsv_rule_on_values():
    """Each task vector cut to its top ⌊r/N⌋ singular triplets, U and V replaced by their polar factors,
    τ* = U⊥ Σ V⊥ᵀ; other tensors the mean; θ = θ₀ + scale·τ*; weights scale the task vectors first."""
    base, experts = _setup()
    got = merge(experts, base, TSVMerge(weights=[1.0, 0.5, 2.0], scale=0.8, not_svd=r"^head\."))
    taus = [(e["layer.0.weight"] - base["layer.0.weight"]) * w for e, w in zip(experts, [1.0, 0.5, 2.0])]
    k = 9 // 3
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, v = torch.cat(us, 1), torch.cat(vs, 1)

    def polar(m):
        p, _, qh = torch.linalg.svd(m, full_matrices=False)
        return p @ qh

    want = polar(u) @ torch.diag(torch.cat(ss)) @ polar(v).T
    torch.testing.assert_close(got["layer.0.weight"], base["layer.0.weight"] + 0.8 * want.float(),
                               rtol=1e-4, atol=1e-5)
    for name in ("layer.0.bias", "head.weight"):  # the mean (head.weight: excluded by not_svd)
        mean = sum((e[name] - base[name]) * w for e, w in zip(experts, [1.0, 0.5, 2.0])) / 3
        torch.testing.assert_close(got[name], base[name] + 0.8 * mean, rtol=1e-5, atol=1e-6)


def test_tsv_sanity():
    """One expert: its full SVD, whitening changes nothing, the expert comes back. Experts with orthogonal
    row and column spaces of rank ≤ r/N: TSV-M is their sum. Scalable: sweep_scale gives merge() at each λ."""
    base, experts = _setup(n=1)
    got = merge(experts, base, TSVMerge())
    for k in base:
        torch.testing.assert_close(got[k], experts[0][k], rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(4)
    q_rows, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    q_cols, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    parts = [q_rows[:, 2 * i:2 * i + 2] @ torch.diag(torch.tensor([3.0, 1.0])) @ q_cols[:, 2 * i:2 * i + 2].T
             for i in range(4)]  # rank 2 each, r/N = 8/4 = 2
    torch.testing.assert_close(task_singular_vectors(parts), sum(parts), rtol=1e-4, atol=1e-5)
    base, experts = _setup()
    result = sweep_scale(TSVMerge(), experts, base, score=lambda s: -float(s["layer.0.weight"].square().sum()),
                         scales=(0.5, 1.5))
    torch.testing.assert_close(result.state["layer.0.weight"],
                               merge(experts, base, TSVMerge(scale=result.scale))["layer.0.weight"])
    assert Strategy.from_dict(TSVMerge(not_svd="head").to_dict()) == TSVMerge(not_svd="head")
    with pytest.raises(ValueError, match="not_svd"):
        TSVMerge(not_svd="(")
    with pytest.raises(ValueError, match="base"):
        merge(experts, None, TSVMerge())


TSV_SCRIPT = """
import sys, torch
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
d = torch.load(sys.argv[1], weights_only=True)
out = compute_and_sum_svd_mem_reduction(d["taus"], exclude_keys=["head.weight"], accelerator="cpu")
torch.save(out, sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("n", [2, 3, 4])
def test_tsv_matches_fusionbench(tmp_path, n):
    base, experts = _setup(n=n, seed=n, shapes={"layer.0.weight": (20, 14), "layer.1.weight": (10, 30),
                                                 "layer.0.bias": (20,), "head.weight": (5, 10)})
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    torch.save({"taus": taus}, tmp_path / "in.pt")
    subprocess.run([FUSION_BENCH, "-c", TSV_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    reference = torch.load(tmp_path / "out.pt", weights_only=True)
    ours = merge(experts, base, TSVMerge(not_svd=r"^head\.weight$"))
    worst = max(float((ours[k] - base[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst
