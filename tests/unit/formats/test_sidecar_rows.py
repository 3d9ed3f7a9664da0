"""Statistics read by rows, and the fingerprint of a tensor past float32's exact integers."""

from __future__ import annotations

import hashlib

import torch

from lightning_merge.formats.sidecar import Statistics, rank1_reconstruct, tensor_fingerprint, write_statistics


def test_a_fingerprint_of_a_tensor_past_2_pow_24_elements_samples_inside_it():
    """linspace's last point rounds up to numel in float32 for 67108864 elements: it is clamped (the tensor's last
    element), and a smaller tensor's fingerprint is what it always was."""
    big = torch.zeros(16384 * 4096)
    big[-1] = 7.0
    a = tensor_fingerprint(big)
    big[-1] = 8.0
    assert tensor_fingerprint(big) != a  # the last element is sampled
    small = torch.arange(1000.0)
    index = torch.linspace(0, 999, 256).round().long()
    expected = hashlib.sha256(b"1000|" + small[index].numpy().tobytes()).hexdigest()[:16]
    assert tensor_fingerprint(small) == expected


def test_statistic_rows_equal_the_rows_of_the_whole(tmp_path):
    g = torch.Generator().manual_seed(0)
    fisher = {"w": torch.rand(9, 5, generator=g), "v": torch.rand(9, 5, generator=g)}
    write_statistics(tmp_path / "s.safetensors", {"exp_avg_sq": fisher},
                     {"exp_avg_sq": {"beta2": 0.99, "step": 3}})
    stats = Statistics.load(tmp_path / "s.safetensors")
    whole = stats.get("w", "exp_avg_sq")
    assert torch.equal(stats.get("w", "exp_avg_sq", rows=(2, 6)), whole[2:6])
    write_statistics(tmp_path / "r.safetensors", {"exp_avg_sq": fisher}, {"exp_avg_sq": {"beta2": 0.99, "step": 3}},
                     compression="rank1")
    r1 = Statistics.load(tmp_path / "r.safetensors")
    assert torch.equal(r1.get("v", "exp_avg_sq", rows=(0, 4)), r1.get("v", "exp_avg_sq")[0:4])
    row, col = fisher["v"].sum(1), fisher["v"].sum(0)
    assert torch.equal(rank1_reconstruct(row, col, (3, 9)), rank1_reconstruct(row, col)[3:9])
