"""LoRA variants read as PEFT merges them (convolutions, lora_bias), and ΔW kept in float32 over a bf16 base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lightning_merge import Expert, TaskArithmetic, merge  # noqa: E402
from lightning_merge.safetensors_io import save_tensors  # noqa: E402


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
