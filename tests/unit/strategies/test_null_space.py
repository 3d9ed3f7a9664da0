"""The SVD-based merges (TSV-M, ISO-C, ISO-CTS, DOGE's shared subspace) give one answer for low-rank experts.

A LoRA expert's task vector has rank 8 of 384: below its numerical rank its singular vectors are a basis of the
null space that LAPACK chooses freely (another CPU chooses another). The references keep such vectors, so their
merge depends on that choice; ``functional.ranked_svd`` zeroes them. Here "another machine" is simulated by an SVD
that returns a randomly rotated (and still exact) basis of each null space: the merges must not move.
"""

import pytest
import torch

from lightning_merge.strategies import doge, isotropic
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.doge import shared_subspace
from lightning_merge.strategies.isotropic import iso_c, iso_cts
from lightning_merge.strategies.tsv import task_singular_vectors


def _lapack(m):
    return torch.linalg.svd(m, full_matrices=False)


def _another_machine(seed):
    """An SVD whose factors past the numerical rank are rotated by random orthogonal matrices (left and right
    independently): as valid an SVD as LAPACK's, with another null-space basis."""
    g = torch.Generator().manual_seed(seed)

    def svd(m):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        null = s <= s[0] * max(m.shape) * torch.finfo(m.dtype).eps
        k = int(null.sum())
        if k:
            left = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0].to(m.dtype)
            right = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0].to(m.dtype)
            u, vh = u.clone(), vh.clone()
            u[:, null] = u[:, null] @ left
            vh[null] = right @ vh[null]
        return u, s, vh

    return svd


def _lora_taus(n=3, rows=48, cols=40, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) * 0.1 for _ in range(n)]


MERGES = {
    "tsv_merge": task_singular_vectors,
    "iso_c": lambda taus: iso_c(sum(taus[1:], taus[0].clone())),
    "iso_cts": lambda taus: iso_cts(taus, 0.8),
    "doge shared subspace": lambda taus: (lambda u: u @ u.T)(shared_subspace(taus, 6.0)),
}


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("merge", sorted(MERGES))
def test_low_rank_experts_merge_the_same_whichever_null_space_basis_the_svd_returns(merge, monkeypatch):
    taus = _lora_taus()
    here = MERGES[merge](taus)
    for seed in range(3):
        monkeypatch.setattr(F, "thin_svd", _another_machine(seed))
        there = MERGES[merge](taus)
        monkeypatch.setattr(F, "thin_svd", _lapack)
        assert _relative(there, here) < 1e-5, merge


@pytest.mark.parametrize("merge", sorted(MERGES))
def test_keeping_the_null_space_vectors_as_the_references_do_makes_the_merge_depend_on_the_basis(merge, monkeypatch):
    """What the rule fixes: with the null-space triplets kept (``ranked_svd`` as plain ``thin_svd``), the same
    rotation moves each merge by far more than rounding."""
    taus = _lora_taus()
    def keeps_all(m):
        return F.thin_svd(m)
    for module in (F, isotropic, doge):
        monkeypatch.setattr(module, "ranked_svd", keeps_all)
    here = MERGES[merge](taus)
    monkeypatch.setattr(F, "thin_svd", _another_machine(0))
    there = MERGES[merge](taus)
    assert _relative(there, here) > 1e-2, merge


def test_ranked_svd_zeroes_the_triplets_past_the_numerical_rank_and_keeps_the_rest():
    taus = _lora_taus(n=1, rank=5)
    u, s, vh = F.ranked_svd(taus[0])
    u0, s0, vh0 = torch.linalg.svd(taus[0], full_matrices=False)
    assert int((s > 0).sum()) == 5  # the product's rank
    assert torch.equal(s[:5], s0[:5]) and torch.equal(u[:, :5], u0[:, :5]) and torch.equal(vh[:5], vh0[:5])
    assert not s[5:].any() and not u[:, 5:].any() and not vh[5:].any()
    assert torch.allclose((u * s) @ vh, taus[0], atol=1e-6)  # still the matrix
    full = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(F.ranked_svd(full), torch.linalg.svd(full, full_matrices=False)))
    zero = F.ranked_svd(torch.zeros(4, 3))
    assert not any(t.any() for t in zero)
