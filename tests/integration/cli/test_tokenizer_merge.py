"""Tokenizer merging as a user runs it, without mergekit: a curvature-aware merge (Fisher, with captured statistics)
of fine-tunes whose vocabularies differ, through a recipe; its token-indexed rows checked against the rule by hand
(docs/cli.md#tokenizer-merging-tokenizer_source-tokenizer)."""

import json

import pytest
import torch
from tokenizer_family import CHAT_TOKENS, write_tokenizer_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main
from lightning_merge.formats.sidecar import write_statistics

pytestmark = pytest.mark.slow  # trains three small BPE tokenizers and builds the model on the meta device

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, experts = write_tokenizer_family(tmp_path_factory.mktemp("vocab"))
    g = torch.Generator().manual_seed(5)
    for folder in experts:
        expert = Expert(folder)
        fisher = {n: torch.rand(expert.spec(n).shape, generator=g) + 0.05 for n in expert.names()}
        write_statistics(folder / "statistics.safetensors", {"fisher.batch": fisher},
                         {"fisher.batch": {"count": 10, "batch_size": 8}})
    return base, experts


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def test_a_fisher_merge_of_differing_vocabularies_weighs_each_token_by_the_experts_that_know_it(tmp_path, family):
    base, experts = family
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text(f"strategy: {{name: fisher, normalize: false}}\nbase_model: {base}\ntokenizer_source: union\n"
                      f"models:\n  - model: {experts[0]}\n  - model: {experts[1]}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    out = Expert(tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    own = [_vocab(e) for e in experts]
    base_vocab = _vocab(base)
    thetas = [Expert(e) for e in experts]
    fishers = [Expert(e).statistic(EMBED, "fisher") for e in experts]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == out.spec(EMBED).shape[0]
    checked = 0
    for token, i in vocab.items():
        if i >= out.spec(EMBED).shape[0]:
            continue
        knows = [token in v and v[token] < thetas[k].spec(EMBED).shape[0] for k, v in enumerate(own)]
        rows = [thetas[k].tensor(EMBED)[own[k][token]] if knows[k] else None for k in range(2)]
        got = out.tensor(EMBED)[i]
        if all(knows):  # both know it: the Fisher-weighted average of their rows
            f = [fishers[k][own[k][token]] for k in range(2)]
            expected = (f[0] * rows[0] + f[1] * rows[1]) / (f[0] + f[1])
        elif any(knows):  # one knows it: its Fisher is zero where it does not, and its row wins
            expected = rows[knows.index(True)]
        else:  # nobody does (the base's reserved entries past its rows are past the output's too)
            continue
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > len(base_vocab) - 10
    assert all(t in vocab for t in CHAT_TOKENS)


def test_bad_tokenizer_recipes_are_refused_by_name(tmp_path, family, capsys):
    base, experts = family
    cases = {
        f"tokenizer_source: {tmp_path}/nowhere": "not found",
        "tokenizer: {source: union, tokens: {'<x>': {source: {kind: model_token, model: BASE, token: nope}}}}":
            "token 'nope' is not in the tokenizer of",
        "tokenizer: {source: union, tokens: {'<x>': {source: {kind: model_token, model: BASE, token_id: 9999}}}}":
            "token_id 9999 is out of range",
    }
    for line, message in cases.items():
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(f"merge_method: linear\nbase_model: {base}\n{line.replace('BASE', str(base))}\n"
                          f"models:\n  - {{model: {experts[0]}, parameters: {{weight: 1}}}}\n"
                          f"  - {{model: {experts[1]}, parameters: {{weight: 1}}}}\n")
        assert main(["merge", str(recipe), str(tmp_path / "never"), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert message in error and "bad.yaml" in error, error
        assert not (tmp_path / "never").exists()


def test_a_tokens_entry_whose_model_lacks_the_token_is_refused_before_any_tensor_is_read(tmp_path, family, capsys,
                                                                                        monkeypatch):
    """``"<new>": {source: expert_0}`` takes expert_0's row of ``<new>``, which expert_0 lacks: the dry run refuses
    it (it used to pass, and the merge then failed on the first embedding, without naming the recipe)."""
    base, experts = family
    recipe = tmp_path / "force.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ntokenizer:\n  source: base\n  tokens:\n"
                      f"    '<new>': {{source: {experts[0]}, force: true}}\n"
                      f"models:\n  - {{model: {experts[0]}, parameters: {{weight: 0.6}}}}\n"
                      f"  - {{model: {experts[1]}, parameters: {{weight: 0.4}}}}\n")
    read = []
    original = Expert.tensor
    monkeypatch.setattr(Expert, "tensor", lambda self, *a, **k: read.append(a[0]) or original(self, *a, **k))
    for extra in (["--dry-run"], []):
        assert main(["merge", str(recipe), str(tmp_path / "never"), "--no-progress", *extra]) == 2
        error = capsys.readouterr().err
        assert "force.yaml" in error and "'<new>'" in error and "lacks" in error and str(experts[0]) in error, error
        assert read == [] and not (tmp_path / "never").exists()


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.ckpt"])
def test_tokenizer_merging_into_a_single_file_is_refused(tmp_path, family, capsys, name):
    """A single-file output holds no tokenizer: the merged rows (152 here, in the union's order) would be written
    with no tokenizer saying which token each row is (the merge used to succeed, silently dropping it)."""
    base, experts = family
    recipe = tmp_path / "union.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ntokenizer_source: union\n"
                      f"models:\n  - {{model: {experts[0]}, parameters: {{weight: 0.6}}}}\n"
                      f"  - {{model: {experts[1]}, parameters: {{weight: 0.4}}}}\n")
    assert main(["merge", str(recipe), str(tmp_path / name), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "union.yaml" in error and "give an output folder" in error, error
    assert not (tmp_path / name).exists()


def _adapter(folder, hidden=64, rank=4):
    """A PEFT LoRA adapter (q_proj, v_proj of both layers) with no tokenizer of its own."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    folder.mkdir()
    tensors = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(rank, hidden, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(hidden, rank, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": False}))
    return folder


def test_a_lora_over_the_base_reads_the_base_tokenizer(tmp_path, family):
    """A bare adapter among the models applies to base_model, so its tokenizer is the base's: the merge equals the
    one naming the model (``base+adapter``), tensor for tensor (it used to fail: no tokenizer in the adapter's
    folder)."""
    base, experts = family
    adapter = _adapter(tmp_path / "adapter")
    outs = []
    for ref in (str(adapter), f"{base}+{adapter}"):
        recipe = tmp_path / "lora.yaml"
        recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ntokenizer_source: union\n"
                          f"models:\n  - {{model: '{ref}', parameters: {{weight: 0.6}}}}\n"
                          f"  - {{model: {experts[1]}, parameters: {{weight: 0.4}}}}\n")
        outs.append(tmp_path / f"out{len(outs)}")
        assert main(["merge", str(recipe), str(outs[-1]), "--no-progress"]) == 0
    bare, named = Expert(outs[0]), Expert(outs[1])
    assert _vocab(outs[0]) == _vocab(outs[1])
    assert sorted(bare.names()) == sorted(named.names())
    for name in named.names():
        torch.testing.assert_close(bare.tensor(name), named.tensor(name), rtol=0, atol=0)
    assert bare.spec(EMBED).shape[0] == json.loads((outs[0] / "config.json").read_text())["vocab_size"]
