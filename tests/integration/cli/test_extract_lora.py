"""``lightning-merge extract-lora``: a PEFT adapter from a full fine-tune that PEFT loads over the base and that gives
the fine-tune back when K is at least the rank of every ΔW (issue 31)."""

import json

import pytest
import torch

from lightning_merge import Expert
from lightning_merge.cli.commands import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama and its fine-tune: every linear weight moved by a rank-2 ΔW, a norm and the embeddings changed,
    one linear weight left as it was."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name and "layers.1.mlp.up_proj" not in name:
                u, v = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                p += 0.02 * u @ v
        model.model.layers[0].input_layernorm.weight += 0.1
        model.model.embed_tokens.weight[3] += 1.0
    model.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _applied(base, adapter):
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()


def test_adapter_over_the_base_is_the_fine_tune(tmp_path, pair):
    base, ft = pair
    assert main(["extract-lora", str(ft), str(tmp_path / "lora"), "--base", str(base), "--rank", "2"]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    assert config["modules_to_save"] == ["model.embed_tokens", "model.layers.0.input_layernorm"]
    assert len(config["target_modules"]) == 2 * 7 and "model.layers.1.mlp.up_proj" in config["target_modules"]
    record = json.loads((tmp_path / "lora" / "lightning_merge.json").read_text())
    assert max(record["relative_error"].values()) < 1e-5
    merged = _applied(base, tmp_path / "lora").state_dict()
    target = Expert(ft)
    worst = max(float((merged[n] - target.tensor(n)).abs().max() / target.tensor(n).abs().max())
                for n in target.names())
    print(f"rank 2 (the true rank): largest relative difference {worst:.2e}")
    assert worst < 1e-5
    assert set(merged) == set(target.names())


def test_a_lower_rank_records_its_error(tmp_path, pair):
    base, ft = pair
    assert main(["extract-lora", str(ft), str(tmp_path / "lora"), "--base", str(base), "--rank", "1"]) == 0
    errors = json.loads((tmp_path / "lora" / "lightning_merge.json").read_text())["relative_error"]
    b, f = Expert(base), Expert(ft)
    delta = f.tensor("model.layers.0.self_attn.q_proj.weight") - b.tensor("model.layers.0.self_attn.q_proj.weight")
    s = torch.linalg.svdvals(delta.double())
    expected = float(s[1:].square().sum().sqrt() / s.square().sum().sqrt())
    assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(expected, rel=1e-3)
    assert errors["model.layers.1.mlp.up_proj"] == 0.0  # unchanged: a zero ΔW
    print(f"rank 1 of rank-2 changes: relative errors {min(errors.values()):.3f}..{max(errors.values()):.3f}")
    applied = _applied(base, tmp_path / "lora").state_dict()["model.layers.0.self_attn.q_proj.weight"]
    got = float((applied - f.tensor("model.layers.0.self_attn.q_proj.weight")).norm() / delta.norm())
    assert got == pytest.approx(expected, rel=1e-3)


def test_refusals(tmp_path, pair):
    base, ft = pair
    assert main(["extract-lora", str(ft), str(tmp_path / "x"), "--base", str(base), "--rank", "0"]) == 2
    assert main(["extract-lora", str(base), str(tmp_path / "x"), "--base", str(base), "--rank", "2"]) == 2
    assert not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    assert main(["extract-lora", str(ft), str(tmp_path / "mine"), "--base", str(base), "--rank", "2",
                 "--overwrite"]) == 2  # a folder the tool did not write
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
