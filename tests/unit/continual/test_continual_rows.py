"""A continual add within a small memory budget folds large tensors in row chunks: the merged model and the running
quantities are the same bit for bit as a whole-tensor add's, and the base's fingerprint is read from a few rows."""

from __future__ import annotations

import pytest
import torch

from lightning_merge import ContinualState
from lightning_merge import strategies as S
from lightning_merge.files.safetensors import load_tensors, save_tensors
from lightning_merge.formats.sidecar import fingerprint_rows, tensor_fingerprint, write_statistics


def _family(root, n=3):
    g = torch.Generator().manual_seed(0)
    base = {"big": torch.randn(600, 130, generator=g), "bias": torch.randn(600, generator=g),
            "steps": torch.tensor([4])}
    root.mkdir(parents=True, exist_ok=True)
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(n):
        expert = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in base.items()}
        save_tensors(root / f"e{i}.safetensors", expert)
        floats = ("big", "bias")
        write_statistics(root / f"e{i}.statistics.safetensors",
                         {"fisher.example": {k: torch.rand(base[k].shape, generator=g) + 0.1 for k in floats},
                          "exp_avg_sq": {k: torch.rand(base[k].shape, generator=g) + 0.1 for k in floats}},
                         {"fisher.example": {"count": 4}, "exp_avg_sq": {"beta2": 0.999, "step": 10}})
        paths.append(root / f"e{i}.safetensors")
    return root / "base.safetensors", paths


@pytest.mark.parametrize("strategy", [S.Linear(), S.TaskArithmetic(scale=0.5), S.Fisher(), S.OTA(), S.RAM(),
                                      S.LiNeS(inner=S.TaskArithmetic(), alpha=0.5, beta=0.5)],
                         ids=["linear", "task_arithmetic", "fisher", "ota", "ram", "lines"])
def test_an_add_in_row_chunks_equals_a_whole_add(tmp_path, strategy):
    base, paths = _family(tmp_path / "fam")
    form = strategy.continual_form()
    assert form.row_local
    models, norms = [], []
    for budget in (None, 40_000):  # 40 kB: the 600 × 130 tensor is folded in chunks
        state = ContinualState.create(tmp_path / f"state-{budget}", base=base, strategy=strategy)
        for p in paths:
            state.add(p, memory_budget=budget)
        norms.append(state.meta()["norms"])
        current = state.path / "generations"
        models.append(state.state_dict())
        running = sorted(current.glob("*/running.safetensors"))[-1]
        models.append(load_tensors(running))
    whole, whole_running, chunked, chunked_running = models
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)
    assert all(torch.equal(whole_running[k], chunked_running[k]) for k in whole_running)
    assert norms[0] == norms[1]  # each row's Σ τ², summed exactly: the recorded norms do not depend on the chunks


def test_opcm_and_sparsified_folds_are_not_row_local():
    assert not S.OPCM().continual_form().row_local
    assert not S.Dare(drop_rate=0.5).continual_form().row_local


def test_the_fingerprint_read_by_rows_is_the_fingerprint(tmp_path):
    for shape in [(300, 7), (5, 3), (1000,), (40000, 3)]:
        x = torch.randn(shape)
        assert fingerprint_rows(lambda rows, x=x: x[rows[0]:rows[1]], shape) == tensor_fingerprint(x)
