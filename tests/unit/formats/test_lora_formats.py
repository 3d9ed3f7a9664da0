"""LoRA variants read as PEFT merges them (convolutions, lora_bias), and ΔW kept in float32 over a bf16 base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lightning_merge import Expert, TaskArithmetic, merge  # noqa: E402
from lightning_merge.files.safetensors import save_tensors  # noqa: E402


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.conv3(self.conv1(x)).mean((2, 3)))


def _adapter(root, config, seed):
    import copy

    torch.manual_seed(0)
    base = ConvNet()
    save_tensors(root / "base.safetensors", base.state_dict())
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    folder = root / f"adapter{seed}"
    model.save_pretrained(folder)
    merged = model.merge_and_unload().state_dict()
    return folder, merged


def test_conv_and_linear_lora_read_as_peft_merges_them(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv3", "head"], init_lora_weights=False)
    folder, merged = _adapter(tmp_path, config, 1)
    expert = Expert(folder, base=tmp_path / "base.safetensors")
    for name, value in merged.items():
        torch.testing.assert_close(expert.tensor(name).float(), value.float(), rtol=1e-5, atol=1e-6)


def test_lora_bias_moves_the_bias_as_peft_merges_it(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "head"], lora_bias=True,
                             init_lora_weights=False)
    folder, merged = _adapter(tmp_path, config, 2)
    expert = Expert(folder, base=tmp_path / "base.safetensors")
    base = Expert(tmp_path / "base.safetensors")
    assert not torch.equal(merged["head.bias"], base.tensor("head.bias"))  # the bias did move
    for name, value in merged.items():
        torch.testing.assert_close(expert.tensor(name).float(), value.float(), rtol=1e-5, atol=1e-6)


def test_conv_and_bias_adapters_merge_into_an_exact_adapter(tmp_path):
    c1 = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv3", "head"], lora_bias=True,
                         init_lora_weights=False)
    a, _ = _adapter(tmp_path, c1, 3)
    b, _ = _adapter(tmp_path, c1, 4)
    base = tmp_path / "base.safetensors"
    strategy = TaskArithmetic(weights=[0.6, 0.4])
    full = merge([a, b], base, strategy)
    out = merge([a, b], base, strategy, out=tmp_path / "merged", output="peft")
    back = Expert(out, base=base)
    for name, value in full.items():
        torch.testing.assert_close(back.tensor(name).float(), value.float(), rtol=1e-5, atol=1e-6)
    svd = merge([a, b], base, strategy, out=tmp_path / "svd", output="peft", rank=8)
    back = Expert(svd, base=base)
    for name, value in full.items():
        torch.testing.assert_close(back.tensor(name).float(), value.float(), rtol=1e-4, atol=1e-5)


def test_a_small_adapter_over_a_bf16_base_keeps_its_whole_update(tmp_path):
    """‖ΔW‖ ≈ 1e-3‖W‖ over a bf16 base: θ₀ + ΔW rounded to bf16 would lose most of ΔW (10 % off before)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=g)
    (tmp_path / "base").mkdir()
    save_tensors(tmp_path / "base" / "model.safetensors", {"layer.weight": weight.to(torch.bfloat16)})
    factors = []
    for i in range(2):
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        a = torch.randn(8, 64, generator=g)
        b = torch.randn(64, 8, generator=g)
        scale = 1e-3 * weight.norm() / (b @ a).norm()
        b = b * scale
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}')
        save_tensors(folder / "adapter_model.safetensors",
                     {"base_model.model.layer.lora_A.weight": a, "base_model.model.layer.lora_B.weight": b})
        factors.append((a, b))
    exact_delta = sum(b @ a for a, b in factors) / 2
    experts = [tmp_path / "a0", tmp_path / "a1"]
    out = merge(experts, tmp_path / "base", TaskArithmetic(scale=0.5), out=tmp_path / "out", output="peft", rank=16)
    back = Expert(out, base=tmp_path / "base")
    delta = back.tensor("layer.weight") - weight.to(torch.bfloat16).float()
    assert float((delta - exact_delta).norm() / exact_delta.norm()) < 1e-4
    tau = Expert(experts[0], base=tmp_path / "base").tensor("layer.weight") - weight.to(torch.bfloat16).float()
    a, b = factors[0]
    assert float((tau - b @ a).norm() / (b @ a).norm()) < 1e-4


@pytest.mark.parametrize(
    ("out_dim", "a_shape", "rank"),
    [(24, (6, 40), 4), (24, (6, 40), 6), (5, (9, 30), 8), (8, (6, 3, 3, 3), 3), (8, (12, 3, 3, 3), 20)],
)
def test_factors_of_a_product_equal_the_svd_of_the_formed_product(out_dim, a_shape, rank):
    """The streaming SVD (QR of each factor, SVD of the small core) gives the dense truncated SVD's product and error,
    in PEFT's shapes, with zero columns where the rank asked exceeds the product's."""
    from lightning_merge.engine.writers import factor_delta, factor_product

    torch.manual_seed(rank)
    inner = a_shape[0]
    b = torch.randn(out_dim, inner, *([1] * (len(a_shape) - 2)))
    a = torch.randn(*a_shape)
    delta = (b.reshape(out_dim, inner) @ a.reshape(inner, -1)).reshape(out_dim, *a_shape[1:])
    got_a, got_b, got_error = factor_product(b, a, rank)
    want_a, want_b, want_error = factor_delta(delta, rank, fan_in_fan_out=False)
    assert got_a.shape == (rank, *a_shape[1:]) and got_b.shape == (out_dim, rank, *([1] * (len(a_shape) - 2)))
    flat = lambda x, y: x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1)  # noqa: E731
    got = flat(got_b.reshape(out_dim, rank), got_a)
    want = flat(want_b.reshape(out_dim, -1), want_a)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert got_error == pytest.approx(want_error, abs=1e-4)
    if rank >= min(out_dim, inner, a.reshape(inner, -1).shape[1]):
        assert got_error < 1e-6  # the full product: exact
        torch.testing.assert_close(got, delta.reshape(out_dim, -1), rtol=1e-4, atol=1e-4 * float(delta.abs().max()))


@pytest.mark.parametrize(
    ("shape", "rank", "true_rank"),
    [((40, 64), 5, 64), ((64, 40), 5, 64), ((40, 64), 40, 64), ((30, 12), 8, 3), ((8, 6, 3, 3), 4, 54), ((6, 5), 3, 0)],
)
def test_module_factors_equal_the_truncated_svd(shape, rank, true_rank):
    """factor_delta's B A is the rank-k truncation of torch.linalg.svd, with its error, in PEFT's shapes (both
    orientations, convolutions, rank-deficient and zero updates)."""
    from lightning_merge.engine.writers import factor_delta

    torch.manual_seed(rank)
    flat = torch.Size((shape[0], int(torch.Size(shape[1:]).numel())))
    if true_rank == 0:
        m = torch.zeros(flat)
    else:
        spectrum = torch.linspace(3.0, 0.1, min(true_rank, *flat))  # distinct singular values
        u, _ = torch.linalg.qr(torch.randn(flat[0], spectrum.numel()))
        v, _ = torch.linalg.qr(torch.randn(flat[1], spectrum.numel()))
        m = (u * spectrum) @ v.T
    a, b, error = factor_delta(m.reshape(shape), rank, fan_in_fan_out=False)
    k = min(rank, *flat)
    assert a.shape == (k, *shape[1:]) and b.shape == (shape[0], k, *([1] * (len(shape) - 2)))
    got = b.reshape(shape[0], k) @ a.reshape(k, -1)
    uu, ss, vh = torch.linalg.svd(m, full_matrices=False)
    want = (uu[:, :k] * ss[:k]) @ vh[:k]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    want_error = float((m - want).norm() / m.norm()) if true_rank else 0.0
    assert error == pytest.approx(want_error, abs=1e-5)
    if true_rank:  # balanced as U√Σ, √ΣVᵀ: both factors carry √σᵢ
        torch.testing.assert_close(b.reshape(shape[0], k).norm(dim=0), a.reshape(k, -1).norm(dim=1), rtol=1e-4,
                                   atol=1e-6)


def test_an_adapter_output_rank_that_cuts_a_flat_spectrum_is_refused_naming_the_rank_that_does_not(tmp_path):
    """ISO-C's merged ΔW has a flat spectrum: every direction it spans has the same singular value, so "its leading
    k" is any k of them, the machine's choice (a probe: a permuted eigh moved the rank-4 adapter's model by 103 %).
    A rank below the spectrum's size is refused, naming the tensor and the rank that writes ΔW exactly; that rank
    gives the batch merge."""
    from lightning_merge import IsoC
    from lightning_merge.engine.lowrank import factor_delta

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["head"], init_lora_weights=False)
    a, _ = _adapter(tmp_path, config, 5)
    b, _ = _adapter(tmp_path, config, 6)
    base = tmp_path / "base.safetensors"
    full = merge([a, b], base, IsoC())
    with pytest.raises(ValueError, match=r"tensor 'head.weight': rank 2 cuts between equal singular values .* write "
                                         r"rank 4 or more"):
        merge([a, b], base, IsoC(), out=tmp_path / "cut", output="peft", rank=2)
    assert not (tmp_path / "cut").exists()
    out = merge([a, b], base, IsoC(), out=tmp_path / "whole", output="peft", rank=4)
    back = Expert(out, base=base)
    for name, value in full.items():
        torch.testing.assert_close(back.tensor(name).float(), value.float(), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(6, 5, generator=g)
    assert factor_delta(distinct, 2, False)[2] > 0  # distinct singular values: any rank is a truncation
