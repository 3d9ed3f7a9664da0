"""The statistics sidecar reader: merge-ready values (bias correction, batch scaling, rank-1), errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import Expert, StatisticsError
from lightning_merge.formats.sidecar import FORMAT, Statistics, names_checksum, rank1_reconstruct, sidecar_path


def write_sidecar(path, tensors, kinds, version=1):
    meta = {
        "format": FORMAT,
        "format_version": str(version),
        "kinds": json.dumps(kinds),
        "names_checksum": names_checksum(["model.w"]),
    }
    save_file(tensors, path, metadata=meta)


def test_sidecar_paths(tmp_path):
    assert sidecar_path(tmp_path / "a.ckpt") == tmp_path / "a.statistics.safetensors"
    assert sidecar_path(tmp_path / "m.safetensors") == tmp_path / "m.statistics.safetensors"
    assert sidecar_path(tmp_path) == tmp_path / "statistics.safetensors"


def test_rank1_reconstruction_exact_for_rank1_and_keeps_sums():
    r, c = torch.rand(5) + 0.1, torch.rand(7) + 0.1
    v = torch.outer(r, c)
    got = rank1_reconstruct(v.sum(1), v.sum(0))
    torch.testing.assert_close(got, v)
    w = torch.rand(5, 7)
    approx = rank1_reconstruct(w.sum(1), w.sum(0))
    torch.testing.assert_close(approx.sum(1), w.sum(1))
    torch.testing.assert_close(approx.sum(0), w.sum(0))
    assert (approx >= 0).all()
    assert torch.equal(rank1_reconstruct(torch.zeros(3), torch.zeros(2)), torch.zeros(3, 2))


def test_merge_ready_values(tmp_path):
    v = torch.rand(4, 3)
    g2 = torch.rand(4, 3)
    fe = torch.rand(4, 3)
    m = torch.rand(6, 5)
    torch.save({"state_dict": {"model.w": torch.zeros(4, 3), "model.m": torch.zeros(6, 5)}}, tmp_path / "x.ckpt")
    write_sidecar(
        tmp_path / "x.statistics.safetensors",
        {
            "exp_avg_sq/model.w": v,
            "fisher.batch/model.w": g2,
            "fisher.example/model.w": fe,
            "exp_avg_sq/model.m:row": m.sum(1),
            "exp_avg_sq/model.m:col": m.sum(0),
        },
        {
            "exp_avg_sq": {"beta2": {"model.w": 0.99, "model.m": 0.999}, "step": {"model.w": 10, "model.m": 3}},
            "fisher.batch": {"batch_size": 64, "count": 10},
            "fisher.example": {"count": 128},
        },
    )
    e = Expert(tmp_path / "x.ckpt", prefix="model.")
    assert e.has_statistic("exp_avg_sq") and e.has_statistic("fisher") and not e.has_statistic("fisher.true")
    torch.testing.assert_close(e.statistic("w", "exp_avg_sq"), v / (1 - 0.99**10))
    torch.testing.assert_close(e.statistic("m", "exp_avg_sq"), rank1_reconstruct(m.sum(1), m.sum(0)) / (1 - 0.999**3))
    torch.testing.assert_close(e.statistic("w", "fisher"), fe)  # example preferred over batch
    torch.testing.assert_close(e.statistic("w", "fisher", estimator="batch"), 64 * g2)
    with pytest.raises(StatisticsError, match="no Fisher estimator 'true'"):
        e.statistic("w", "fisher", estimator="true")
    with pytest.raises(StatisticsError, match="no 'exp_avg_sq' statistic for tensor 'model.nope'"):
        e.statistic("nope", "exp_avg_sq")


def test_in_memory_statistics_override():
    f = torch.rand(2, 2)
    e = Expert({"w": torch.zeros(2, 2)}, statistics={"fisher": {"w": f}})
    assert torch.equal(e.statistic("w", "fisher"), f)
    with pytest.raises(StatisticsError, match="has no statistics"):
        Expert({"w": torch.zeros(2)}).statistic("w", "fisher")


def test_bad_sidecars_are_reported(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(StatisticsError, match="truncated or corrupted"):
        Statistics.load(path)
    save_file({"a": torch.zeros(1)}, path, metadata={"format": "other"})
    with pytest.raises(StatisticsError, match="not a lightning-merge statistics file"):
        Statistics.load(path)
    write_sidecar(path, {"fisher.true/w": torch.zeros(1)}, {"fisher.true": {}}, version=99)
    with pytest.raises(StatisticsError, match="version 99.*upgrade"):
        Statistics.load(path)
