"""The SVD-based merges (TSV-M, ISO-C, ISO-CTS, DOGE's shared subspace) give one answer for low-rank experts.

A LoRA expert's task vector has rank 8 of 384: below its numerical rank its singular vectors are a basis of the
null space that LAPACK chooses freely (another CPU, another driver, chooses another). The references keep such
vectors, so their merge depends on that choice; ``functional.ranked_svd`` zeroes them. "Another machine" is here
another valid SVD of the same matrix: LAPACK's of the transpose, the float64 one, numpy's.
"""

import numpy as np
import pytest
import torch

from lightning_merge import merge
from lightning_merge import strategies as S
from lightning_merge.strategies import functional as F
from lightning_merge.strategies import isotropic
from lightning_merge.strategies.doge import shared_subspace
from lightning_merge.strategies.isotropic import iso_c, iso_cts
from lightning_merge.strategies.tsv import task_singular_vectors

LAPACK = F.thin_svd


def _transposed(m):
    v, s, uh = torch.linalg.svd(m.T, full_matrices=False)
    return uh.T.contiguous(), s, v.T.contiguous()


def _float64(m):
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def _numpy(m):
    u, s, vh = np.linalg.svd(m.numpy(), full_matrices=False)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


OTHER_MACHINES = {"transposed": _transposed, "float64": _float64, "numpy": _numpy}


def _lora_taus(n=3, rows=64, cols=48, rank=4, seed=0):
    """What a merge of LoRA experts reads: float32 θ₀ + BA, less θ₀ (so rank 4 plus float32 rounding noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.05
    return [(base + torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) * 0.01) - base
            for _ in range(n)]


MERGES = {
    "tsv_merge": task_singular_vectors,
    "iso_c": lambda taus: iso_c(sum(taus[1:], taus[0].clone())),
    "iso_cts": lambda taus: iso_cts(taus, 0.8),
    "iso_cts (f 0.5)": lambda taus: iso_cts(taus, 0.5),
    "doge shared subspace": lambda taus: (lambda u: u @ u.T)(shared_subspace(taus, 6.0)),
}


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("machine", sorted(OTHER_MACHINES))
@pytest.mark.parametrize("merge", sorted(MERGES))
def test_low_rank_experts_merge_the_same_whichever_valid_svd_the_machine_returns(merge, machine, monkeypatch):
    taus = _lora_taus()
    here = MERGES[merge](taus)
    monkeypatch.setattr(F, "thin_svd", OTHER_MACHINES[machine])
    there = MERGES[merge](taus)
    assert _relative(there, here) < 1e-4, (merge, machine)


@pytest.mark.parametrize("machine", sorted(OTHER_MACHINES))
def test_tsv_m_of_experts_that_share_their_directions_is_one_answer(machine, monkeypatch):
    """Identical or collinear experts leave TSV-M's gathered U rank-deficient: its polar factor is taken over the
    numerical rank, and two identical experts merge to their task vector."""
    (tau,) = _lora_taus(n=1, rank=6)
    for taus in ([tau, tau.clone()], [tau, 2 * tau]):
        monkeypatch.setattr(F, "thin_svd", LAPACK)
        here = task_singular_vectors(taus)
        monkeypatch.setattr(F, "thin_svd", OTHER_MACHINES[machine])
        assert _relative(task_singular_vectors(taus), here) < 1e-4
    monkeypatch.setattr(F, "thin_svd", LAPACK)
    torch.testing.assert_close(task_singular_vectors([tau, tau.clone()]), tau, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("merge", sorted(MERGES))
def test_keeping_the_null_space_vectors_as_the_references_do_makes_the_merge_depend_on_the_machine(merge,
                                                                                                    monkeypatch):
    """What the rule fixes: with every triplet kept (``ranked_svd`` as plain ``thin_svd``, the references' rule),
    another valid SVD moves each merge by far more than rounding."""
    taus = _lora_taus()

    def keeps_all(m, scale=None, floor=0.0):
        return F.thin_svd(m)

    monkeypatch.setattr(F, "ranked_svd", keeps_all)
    monkeypatch.setattr(isotropic, "ranked_svd", keeps_all)
    monkeypatch.setattr("lightning_merge.strategies.doge.ranked_svd", keeps_all)
    here = MERGES[merge](taus)
    moved = []
    for machine in OTHER_MACHINES.values():
        monkeypatch.setattr(F, "thin_svd", machine)
        moved.append(_relative(MERGES[merge](taus), here))
        monkeypatch.setattr(F, "thin_svd", LAPACK)
    assert max(moved) > 1e-2, (merge, moved)


def test_ranked_svd_zeroes_the_triplets_past_the_numerical_rank_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(48, 5, generator=g) @ torch.randn(5, 40, generator=g)
    u, s, vh = F.ranked_svd(low)
    u0, s0, vh0 = torch.linalg.svd(low, full_matrices=False)
    assert int((s > 0).sum()) == 5  # the product's rank
    assert torch.equal(s[:5], s0[:5]) and torch.equal(u[:, :5], u0[:, :5]) and torch.equal(vh[:5], vh0[:5])
    assert not s[5:].any() and not u[:, 5:].any() and not vh[5:].any()
    torch.testing.assert_close((u * s) @ vh, low, rtol=1e-5, atol=1e-5)  # still the matrix
    full = torch.randn(30, 20, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(F.ranked_svd(full), torch.linalg.svd(full, full_matrices=False)))
    assert not any(t.any() for t in F.ranked_svd(torch.zeros(4, 3)))
    # a residual of rounding noise (nothing left of τ) has rank 0 at τ's scale, full rank at its own
    tau = low
    q = torch.linalg.svd(tau, full_matrices=False)[0][:, :5]
    residual = tau - q @ (q.T @ tau)
    assert int((F.ranked_svd(residual)[1] > 0).sum()) > 5
    assert not F.ranked_svd(residual, scale=torch.linalg.vector_norm(tau))[1].any()


def _small_update_experts(ratio, n=3, rows=64, cols=48, rank=4, seed=0):
    """Adapters merged as the engine reads them, θ₀ + BA in float32, with ‖BA‖ about ``ratio`` of ‖θ₀‖: the task
    vector (θ₀ + BA) − θ₀ carries full-rank rounding of θ₀'s size, above σ₁(τ)·max(m, n)·ε once the update is
    small."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.05
    experts = []
    for _ in range(n):
        delta = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
        experts.append(base + delta * (ratio * float(base.norm() / delta.norm())))
    return base, experts


# ISO-C and ISO-CTS are left out: their flat spectrum gives every direction above the tolerance full weight, and a
# floor at the weights' rounding, which would drop an adapter's noise directions, also dropped real small directions
# of full fine-tunes (a review: 3–6 % from the reference); docs/strategies.md says so
STRATEGIES = {
    "tsv_merge": S.TSVMerge(),
    "tsv_merge (gram metric)": S.TSVMerge(metric="gram", damping=0.01),
    "doge_ta": S.DogeTA(iterations=5),
}


@pytest.mark.parametrize("ratio", [1e-2, 2e-4, 1e-5])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_small_updates_merge_the_same_whichever_valid_svd_the_machine_returns(strategy, ratio, monkeypatch):
    """The tolerance also covers the float32 rounding of θ₀ + ΔW (functional.rounding_noise): a review measured
    moves of 0.26–0.64 under the transpose's SVD at ‖ΔW‖/‖θ₀‖ = 1.8e-4 when it counted only σ₁(τ)·max(m, n)·ε."""
    base, experts = _small_update_experts(ratio)
    g = torch.Generator().manual_seed(5)
    stats = []
    for _ in experts:
        x = torch.randn(96, 48, generator=g)
        stats.append({"gram": x.T @ x / 96})
    chosen = STRATEGIES[strategy]

    def merged():
        if isinstance(chosen, S.DogeTA):  # a model-wide pass first (its masks): through merge()
            return merge([{"w": e} for e in experts], {"w": base}, chosen)["w"] - base
        return chosen.merge_tensor("w", base, experts, stats) - base

    here = merged()
    for machine in OTHER_MACHINES.values():
        monkeypatch.setattr(F, "thin_svd", machine)
        there = merged()
        monkeypatch.setattr(F, "thin_svd", LAPACK)
        assert _relative(there, here) < 1e-4, (strategy, ratio)


@pytest.mark.parametrize("make", [
    lambda p: S.TSVMerge(not_svd=p), lambda p: S.IsoC(not_svd=p), lambda p: S.IsoCTS(not_svd=p),
    lambda p: S.DogeTA(not_svd=p), lambda p: S.CATMerging(norm_pattern=p), lambda p: S.WIDEN(embeddings=p),
    lambda p: S.OPCM(not_linear=p)])
@pytest.mark.parametrize("pattern", ["", "lm_head|", "|embed", "q||k"])
def test_an_empty_pattern_or_alternative_is_refused_it_would_name_every_tensor(make, pattern):
    """A probe found not_svd="" turning TSV-M, ISO-C and ISO-CTS into the mean and DOGE-TA into the base, silently:
    re.search finds the empty string in every name. Patterns that match the empty string on purpose (a negative
    lookahead, as docs/strategies.md's DOGE-TA example; "$^" for none) are kept."""
    with pytest.raises(ValueError, match="has an empty alternative, so it would name every tensor"):
        make(pattern)
    for kept in (r"lm_head", r"^(?!.*encoder)|layer_norm", r"(embed|)", r"$^", r"[|]"):
        make(kept)
