"""TSV-M (task singular vectors): the rule on values, its sanity properties, and parity with FusionBench's
``compute_and_sum_svd_mem_reduction`` (run in its own environment when one is found)."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSION_BENCH, fusion_bench_runs, state_dicts

from lightning_merge import TSVMerge, merge
from lightning_merge.strategies import Strategy
from lightning_merge.strategies.tsv import task_singular_vectors
from lightning_merge.tools.evaluation import sweep_scale

SHAPES = {"layer.0.weight": (12, 9), "layer.0.bias": (12,), "head.weight": (4, 12)}


def _setup(n=3, seed=0, shapes=None):
    return state_dicts(shapes or SHAPES, n, seed)


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


def _tsv_case(n):
    return _setup(n=n, seed=n, shapes={"layer.0.weight": (20, 14), "layer.1.weight": (10, 30), "layer.0.bias": (20,),
                                       "head.weight": (5, 10)})


@pytest.fixture(scope="module")
def tsv_references(tmp_path_factory):
    """FusionBench's TSV-M of each case below, from one FusionBench process."""
    folder = tmp_path_factory.mktemp("tsv")
    for n in TSV_CASES:
        base, experts = _tsv_case(n)
        torch.save({"taus": [{k: e[k] - base[k] for k in base} for e in experts]}, folder / f"in{n}.pt")
    fusion_bench_runs(TSV_SCRIPT, [[folder / f"in{n}.pt", folder / f"out{n}.pt"] for n in TSV_CASES], folder)
    return {n: torch.load(folder / f"out{n}.pt", weights_only=True) for n in TSV_CASES}


TSV_CASES = (2, 3, 4)


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("n", TSV_CASES)
def test_tsv_matches_fusionbench(tsv_references, n):
    base, experts = _tsv_case(n)
    reference = tsv_references[n]
    ours = merge(experts, base, TSVMerge(not_svd=r"^head\.weight$"))
    worst = max(float((ours[k] - base[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst


# -- TSV-M in the metric of the captured curvature (issue 33) ------------------------------------------------------
def _metric_case(n=3, seed=1, out=7, inp=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inp, generator=g)
    taus = [0.1 * torch.randn(out, inp, generator=g) for _ in range(n)]
    xs = [torch.randn(16, inp, generator=g) for _ in range(n)]
    grams = [(x.T @ x / 16 + (x.T @ x / 16).T) / 2 for x in xs]
    fishers = [torch.rand(out, inp, generator=g) + 0.1 for _ in range(n)]
    return base, taus, grams, fishers


@pytest.mark.parametrize("metric", ["gram", "fisher.batch", "exp_avg_sq"])
@pytest.mark.parametrize("level", [1.0, 3.7])
def test_tsv_metric_identity_is_plain_tsv_bit_for_bit(metric, level):
    """Identity Grams (any level) or uniform curvature: the metric is the identity after its normalisation, and
    the merge is plain TSV-M exactly, whatever the damping."""
    base, taus, _, _ = _metric_case()
    tensors = [base + t for t in taus]
    stat = torch.eye(5) * level if metric == "gram" else torch.full((7, 5), level)
    plain = TSVMerge(scale=0.7).merge_tensor("w", base, tensors, [{}] * 3)
    for damping in (0.0, 0.01, 1.0):
        got = TSVMerge(scale=0.7, metric=metric, damping=damping).merge_tensor("w", base, tensors, [{metric: stat}] * 3)
        assert torch.equal(got, plain)


def test_tsv_metric_whitening_round_trip():
    """M^{1/2} M^{-1/2} = I and M^{1/2} M^{1/2} = M (normalised, damped); a rank-deficient M's pseudo-inverse
    and null projector give the identity on its range and its null space."""
    from lightning_merge.strategies.tsv import metric_roots

    _, _, grams, _ = _metric_case()
    m = grams[0].double()
    m_norm = m / m.diagonal().mean()
    for damping in (0.0, 0.1):
        half, inv, null, gain = metric_roots(grams[0], damping)
        assert null is None
        assert gain == pytest.approx(float(torch.linalg.matrix_norm(half, 2)), rel=1e-12)
        target = (m_norm + damping * torch.eye(5, dtype=torch.float64)) / (1 + damping)
        torch.testing.assert_close(half @ half, target, rtol=0, atol=1e-12)
        torch.testing.assert_close(half @ inv, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    deficient = x @ x.T  # rank 3
    half, inv, null, _ = metric_roots(deficient, 0.0)
    projector = half @ inv
    torch.testing.assert_close(projector + null, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(projector @ x, x, rtol=0, atol=1e-10)
    half, inv, null, gain = metric_roots(torch.tensor([4.0, 0.0, 1.0]), 0.0)  # diagonal: elementwise
    assert gain == float(half.max())
    assert torch.equal(null, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(half * inv, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_tsv_metric_is_tsv_of_whitened_task_vectors():
    """The definition on values: τ* = TSV-M(τᵢ M^{1/2}) M^{-1/2} with M the mean of the α-shrunk Grams, normalised
    and damped; and diag(√a) τ diag(√b) with the Adafactor factors of the mean-normalised Fishers."""
    base, taus, grams, fishers = _metric_case()
    tensors = [base + t for t in taus]
    alpha, damping = 0.6, 0.05
    shrunk = [alpha * g.double() + (1 - alpha) * torch.diag(g.double().diagonal()) for g in grams]
    m = sum(shrunk) / 3
    m = m / m.diagonal().mean()
    m = (m + damping * torch.eye(5, dtype=torch.float64)) / (1 + damping)
    values, vectors = torch.linalg.eigh(m)
    half = vectors @ torch.diag(values.sqrt()) @ vectors.T
    inv = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    expected = task_singular_vectors([(t.double() @ half).float() for t in taus]).double() @ inv
    got = TSVMerge(metric="gram", alpha=alpha, damping=damping).merge_tensor(
        "w", base, tensors, [{"gram": g} for g in grams])
    torch.testing.assert_close(got, base + expected.float(), rtol=0, atol=1e-5)
    fbar = sum(f.double() / f.double().mean() for f in fishers) / 3
    a, b = fbar.mean(1), fbar.mean(0)
    a, b = (a / a.mean() + damping) / (1 + damping), (b / b.mean() + damping) / (1 + damping)
    white = [(a.sqrt()[:, None] * t.double() * b.sqrt()).float() for t in taus]
    expected = task_singular_vectors(white).double() / a.sqrt()[:, None] / b.sqrt()
    got = TSVMerge(metric="fisher", damping=damping).merge_tensor("w", base, tensors, [{"fisher": f} for f in fishers])
    torch.testing.assert_close(got, base + expected.float(), rtol=0, atol=1e-5)


def test_tsv_metric_two_experts_by_hand():
    """Two rank-1 task vectors on 2×2 weights (k = 1 each), Gram diag(4, 1) for both, δ = 0: τ₁ = e₁(1, 1),
    τ₂ = e₂(1, −1). Plain TSV-M keeps them (orthogonal already): τ* = [[1, 1], [1, −1]]. In the metric,
    M = diag(1.6, 0.4) (mean diagonal 1), the whitened rows are e₁(c, s)√2 and e₂(c, −s)√2 with c = √0.8, s = √0.2:
    U = I, Σ = (√2, √2), V = [[c, c], [s, −s]] = diag(c√2, s√2)·H with H = [[1, 1], [1, −1]]/√2 orthogonal, so V's
    polar factor is H and τ̃* = U Σ Hᵀ = [[1, 1], [1, −1]]; mapped back, τ* = τ̃* M^{-1/2} =
    [[1/√1.6, 1/√0.4], [1/√1.6, −1/√0.4]]: the step along the rarely-excited input grows, the other shrinks."""
    base = torch.zeros(2, 2)
    taus = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, -1.0]])]
    stats = [{"gram": torch.diag(torch.tensor([4.0, 1.0]))}] * 2
    plain = TSVMerge().merge_tensor("w", base, taus, [{}] * 2)
    torch.testing.assert_close(plain, torch.tensor([[1.0, 1.0], [1.0, -1.0]]), rtol=0, atol=1e-6)
    got = TSVMerge(metric="gram", damping=0.0).merge_tensor("w", base, taus, stats)
    a, b = 1.6 ** -0.5, 0.4 ** -0.5
    torch.testing.assert_close(got, torch.tensor([[a, b], [a, -b]]), rtol=0, atol=1e-6)


def test_tsv_metric_null_space_takes_the_mean():
    """δ = 0 and an input feature no expert saw (a zero row and column of every Gram): that column of τ* is the
    mean of the experts' columns; the others come from the whitened TSV-M of the seen features."""
    base, taus, grams, _ = _metric_case()
    dead = [g.clone() for g in grams]
    for g in dead:
        g[2, :] = 0
        g[:, 2] = 0
    tensors = [base + t for t in taus]
    got = TSVMerge(metric="gram", alpha=1.0, damping=0.0).merge_tensor("w", base, tensors, [{"gram": g} for g in dead])
    torch.testing.assert_close(got[:, 2] - base[:, 2], torch.stack(taus).mean(0)[:, 2], rtol=0, atol=1e-6)
    live = [0, 1, 3, 4]
    seen = TSVMerge(metric="gram", alpha=1.0, damping=0.0).merge_tensor(
        "w", base[:, live], [t[:, live] for t in tensors], [{"gram": g[live][:, live]} for g in dead])
    torch.testing.assert_close(got[:, live], seen, rtol=0, atol=1e-5)


def test_tsv_metric_arguments_refused_by_name():
    """An unknown metric, α outside [0, 1] and a negative damping name the argument."""
    with pytest.raises(ValueError, match="metric"):
        TSVMerge(metric="hessian")
    with pytest.raises(ValueError, match="alpha"):
        TSVMerge(metric="gram", alpha=1.5)
    with pytest.raises(ValueError, match="damping"):
        TSVMerge(metric="gram", damping=-0.1)
    with pytest.raises(ValueError, match="mask"):
        TSVMerge(mask="gram")
    with pytest.raises(ValueError, match="density"):
        TSVMerge(mask="fisher", density=0.0)
    assert TSVMerge(metric="gram").requires == ("gram",) and TSVMerge().requires == ()
    assert TSVMerge(metric="gram", mask="fisher.batch").requires == ("gram", "fisher.batch")
    assert TSVMerge(metric="fisher", mask="fisher").requires == ("fisher",)


def test_tsv_saliency_mask_before_the_svd():
    """``mask``: each τᵢ keeps its top-density entries by Fᵢ ⊙ τᵢ² (zeros elsewhere) before TSV-M; density 1 is
    plain TSV-M exactly; a hand case: 2×2, density 0.5 keeps the two most salient entries of each expert."""
    base, taus, grams, fishers = _metric_case()
    tensors = [base + t for t in taus]
    stats = [{"fisher": f, "gram": g} for f, g in zip(fishers, grams)]
    plain = TSVMerge().merge_tensor("w", base, tensors, stats)
    assert torch.equal(TSVMerge(mask="fisher", density=1.0).merge_tensor("w", base, tensors, stats), plain)
    k = int(0.3 * 35)
    masked = []
    for t, f in zip(taus, fishers):
        score = (f * t.square()).flatten()
        keep = torch.zeros(35, dtype=torch.bool)
        keep[score.argsort(descending=True)[:k]] = True
        masked.append(t * keep.view(7, 5))
    expected = base + task_singular_vectors(masked)
    got = TSVMerge(mask="fisher", density=0.3).merge_tensor("w", base, tensors, stats)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    got = TSVMerge(mask="fisher", density=0.3, metric="gram", damping=0.1).merge_tensor("w", base, tensors, stats)
    expected = TSVMerge(metric="gram", damping=0.1).merge_tensor("w", base, [base + m for m in masked], stats)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # by hand: τ₁ = [[3, 1], [1, 2]], F₁ = [[0.1, 4], [1, 1]]: saliency [[0.9, 4], [1, 4]] keeps [[0, 1], [0, 2]];
    # τ₂ = [[2, 0.5], [-1, 0.3]], F₂ = 1: saliency [[4, 0.25], [1, 0.09]] keeps [[2, 0], [-1, 0]]. Both kept parts
    # are rank 1 with orthogonal U (½(1, 2)·√… ⟂ (2, −1)) and V (e₂ ⟂ e₁), so TSV-M (k = 1) returns their sum.
    zero = torch.zeros(2, 2)
    pair = [torch.tensor([[3.0, 1.0], [1.0, 2.0]]), torch.tensor([[2.0, 0.5], [-1.0, 0.3]])]
    curv = [{"fisher": torch.tensor([[0.1, 4.0], [1.0, 1.0]])}, {"fisher": torch.ones(2, 2)}]
    got = TSVMerge(mask="fisher", density=0.5).merge_tensor("w", zero, pair, curv)
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.0], [-1.0, 2.0]]), rtol=0, atol=1e-6)
