"""Models whose checkpoint leaves out a tensor tied to another (an LM head tied to the input embedding), read as
holding both (mergekit's ``tied_names``), and the recipe rule that applies it (``tools/architectures.py``)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge import Expert
from lightning_merge.errors import RecipeError
from lightning_merge.sources.tied import TiedExpert
from lightning_merge.tools.architectures import tied_groups, untied_config, with_tied_tensors
from lightning_merge.tools.recipe import load_recipe
from lightning_merge.tools.testing import llama_config, write_llama_family


def _tensors(g, head=True):
    out = {"embed.weight": torch.randn(6, 4, generator=g), "layer.weight": torch.randn(4, 4, generator=g)}
    if head:
        out["head.weight"] = torch.randn(6, 4, generator=g)
    return out


def test_a_tied_name_reads_its_target_tensor_rows_spec_and_statistics():
    g = torch.Generator().manual_seed(0)
    tensors = _tensors(g, head=False)
    fisher = {n: torch.rand(t.shape, generator=g) for n, t in tensors.items()}
    inner = Expert(tensors, statistics={"fisher": fisher}, name="tied model")
    tied = TiedExpert(inner, {"head.weight": "embed.weight"})
    assert tied.names() == ["embed.weight", "layer.weight", "head.weight"]
    assert "head.weight" in tied and tied.name == "tied model"
    assert torch.equal(tied.tensor("head.weight"), tensors["embed.weight"])
    assert torch.equal(tied.float32("head.weight", rows=(2, 5)), tensors["embed.weight"][2:5])
    assert tied.spec("head.weight") == inner.spec("embed.weight")
    assert torch.equal(tied.statistic("head.weight", "fisher"), fisher["embed.weight"])
    assert torch.equal(tied.statistic("layer.weight", "fisher"), fisher["layer.weight"])
    assert tied.subset(["head.weight"]).names() == ["head.weight"]
    assert torch.equal(tied.subset(["head.weight"]).tensor("head.weight"), tensors["embed.weight"])


def test_a_tie_to_a_name_held_or_to_a_missing_tensor_is_refused():
    inner = Expert(_tensors(torch.Generator().manual_seed(0)), name="m")
    with pytest.raises(ValueError, match="'m' holds 'head.weight' itself"):
        TiedExpert(inner, {"head.weight": "embed.weight"})
    with pytest.raises(ValueError, match="'m' has no tensor 'wte.weight'"):
        TiedExpert(Expert(_tensors(torch.Generator(), head=False), name="m"), {"head.weight": "wte.weight"})


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A Llama base saved tied (no lm_head.weight, tie_word_embeddings true) and two untied experts."""
    root = tmp_path_factory.mktemp("tied")
    tied_base, _ = write_llama_family(root / "tied", llama_config(hidden=16, layers=1, intermediate=32, vocab=32,
                                                                  tie_embeddings=True), n_experts=0,
                                      dtype=torch.float32)
    _, experts = write_llama_family(root / "untied", llama_config(hidden=16, layers=1, intermediate=32, vocab=32),
                                    n_experts=2, dtype=torch.float32, seed=1)
    return tied_base, experts


def test_the_architecture_says_which_names_are_tied(llamas):
    tied_base, experts = llamas
    assert tied_groups(tied_base) == [("model.embed_tokens.weight", "lm_head.weight")]
    assert tied_groups(experts[0]) == []


def test_only_a_model_lacking_a_name_another_holds_is_read_tied(llamas):
    tied_base, experts = llamas
    base, e0, e1 = Expert(tied_base), Expert(experts[0]), Expert(experts[1])
    out = with_tied_tensors([(base, tied_base), (e0, experts[0]), (e1, experts[1])], tied_base / "r.yaml")
    assert isinstance(out[0], TiedExpert) and out[0].tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert out[1] is e0 and out[2] is e1
    assert untied_config(out[0]) == {"tie_word_embeddings": False} and untied_config(out[1]) == {}
    alone = with_tied_tensors([(base, tied_base), (Expert(tied_base), tied_base)], tied_base / "r.yaml")
    assert [type(e) for e in alone] == [Expert, Expert]  # no model holds a head: nothing is added


def test_a_config_that_says_it_ties_but_cannot_be_built_is_named(tmp_path, llamas):
    _, experts = llamas
    odd = tmp_path / "odd"
    odd.mkdir()
    Expert(experts[0])  # (the experts are readable)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, odd / "model.safetensors")
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "tie_word_embeddings": True}))
    with pytest.raises(RecipeError, match="reading the tied weights of '.*odd'.*lacks 'lm_head.weight'"):
        with_tied_tensors([(Expert(odd), odd), (Expert(experts[0]), experts[0])], tmp_path / "r.yaml")
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))  # says nothing: left as is
    out = with_tied_tensors([(Expert(odd), odd), (Expert(experts[0]), experts[0])], tmp_path / "r.yaml")
    assert not isinstance(out[0], TiedExpert)


def test_a_recipe_with_a_tied_base_merges_its_embedding_as_the_base_head(tmp_path, llamas):
    """Task arithmetic's head: the base's embedding plus each expert's head minus that embedding, weighted; the
    output config unties the embeddings."""
    tied_base, experts = llamas
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tied_base}\ndtype: float32\nmodels:\n"
                      f"  - {{model: {experts[0]}, parameters: {{weight: 0.5}}}}\n"
                      f"  - {{model: {experts[1]}, parameters: {{weight: 0.25}}}}\n")
    loaded = load_recipe(recipe)
    assert loaded.files["config.json"] == {"tie_word_embeddings": False}
    from lightning_merge import merge

    merged = merge(loaded.experts, loaded.base, loaded.strategy, out=None)
    embed = Expert(tied_base).tensor("model.embed_tokens.weight")
    heads = [Expert(e).tensor("lm_head.weight") for e in experts]
    torch.testing.assert_close(merged["lm_head.weight"], embed + 0.5 * (heads[0] - embed) + 0.25 * (heads[1] - embed))


def _qwen2_vl_config(folder, tie, text_tie=None, vocab=32):
    """A tiny Qwen2-VL config.json (a vision-language model: transformers builds it as
    Qwen2VLForConditionalGeneration, whose parameters are named model.language_model.*; its checkpoints, as
    transformers saves them, keep the names model.embed_tokens.weight, model.layers.*, visual.*). ``text_tie``: its
    ``text_config`` says ``tie_word_embeddings`` too (as Qwen3-VL's configs do)."""
    from transformers import Qwen2VLConfig

    folder.mkdir(parents=True)
    text = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 32, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 0]}}
    config = Qwen2VLConfig(text_config=text, vision_config={"depth": 1, "embed_dim": 8, "hidden_size": 16,
                                                           "num_heads": 2},
                           architectures=["Qwen2VLForConditionalGeneration"], tie_word_embeddings=tie).to_dict()
    if text_tie is not None:  # written as given (transformers' config class would make the top level agree)
        config["text_config"]["tie_word_embeddings"] = text_tie
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_vision_language_models_ties_are_named_as_its_checkpoint_names_them(tmp_path):
    """The tie of a Qwen2-VL saved tied: the checkpoint's lm_head.weight is its model.embed_tokens.weight (the name
    transformers saves), so it merges with a fine-tune that has its own head."""
    from safetensors.torch import save_file

    tied = _qwen2_vl_config(tmp_path / "tied", tie=True)
    untied = _qwen2_vl_config(tmp_path / "untied", tie=False)
    g = torch.Generator().manual_seed(0)
    embed, head = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    save_file({"model.embed_tokens.weight": embed}, tied / "model.safetensors")
    save_file({"model.embed_tokens.weight": embed + 1, "lm_head.weight": head}, untied / "model.safetensors")
    assert any({"model.embed_tokens.weight", "lm_head.weight"} <= set(group) for group in tied_groups(tied))
    out = with_tied_tensors([(Expert(tied), tied), (Expert(untied), untied)], tmp_path / "r.yaml")
    assert isinstance(out[0], TiedExpert) and out[0].tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(out[0].tensor("lm_head.weight"), embed)


def test_a_vision_language_models_tie_is_read_from_its_text_config_too(tmp_path):
    """transformers 5 ties a vision-language model's head when its text_config or its top level says so: a
    checkpoint without lm_head.weight is read tied when either says true, and not when both say false."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    g = torch.Generator().manual_seed(0)
    embed = torch.randn(32, 16, generator=g)
    untied = _qwen2_vl_config(tmp_path / "untied", tie=False)
    save_file({"model.embed_tokens.weight": embed + 1, "lm_head.weight": embed - 1}, untied / "model.safetensors")
    for top, text in ((False, True), (True, False), (False, False)):
        folder = _qwen2_vl_config(tmp_path / f"{top}_{text}", tie=top, text_tie=text)
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder))
        assert (model.lm_head.weight is model.get_input_embeddings().weight) is (top or text)  # transformers' rule
        save_file({"model.embed_tokens.weight": embed}, folder / "model.safetensors")
        out = with_tied_tensors([(Expert(folder), folder), (Expert(untied), untied)], tmp_path / "r.yaml")
        assert isinstance(out[0], TiedExpert) is (top or text)


def test_a_config_silent_on_ties_is_read_tied_as_mergekit_reads_it(tmp_path, llamas):
    """A Llama saved without lm_head.weight whose config.json does not say tie_word_embeddings (transformers'
    Llama default is untied): mergekit reads its head as its embedding (its tied_names); so does the recipe."""
    tied_base, experts = llamas
    silent = tmp_path / "silent"
    silent.mkdir()
    config = json.loads((tied_base / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (silent / "config.json").write_text(json.dumps(config))
    for f in tied_base.glob("*.safetensors*"):
        (silent / f.name).symlink_to(f)
    out = with_tied_tensors([(Expert(silent), silent), (Expert(experts[0]), experts[0])], tmp_path / "r.yaml")
    assert isinstance(out[0], TiedExpert) and out[0].tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert untied_config(out[0]) == {"tie_word_embeddings": False}


def test_an_encoder_decoder_keeps_its_config(tmp_path):
    """T5's tie_word_embeddings also switches its decoder output scaling (and transformers 5 ties its head anyway):
    a tied T5 donor's config is not rewritten."""
    from lightning_merge.sources.tied import TiedExpert as Tied

    folder = tmp_path / "t5"
    folder.mkdir()
    save_file({"shared.weight": torch.zeros(4, 2)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    tied = Tied(Expert(folder), {"lm_head.weight": "shared.weight"})
    assert untied_config(tied) == {}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert untied_config(Tied(Expert(folder), {"lm_head.weight": "shared.weight"})) == {"tie_word_embeddings": False}


def test_a_vision_language_models_embeddings_are_found_under_its_checkpoint_names(tmp_path):
    """Tokenizer merging finds a Qwen2-VL's token-indexed tensors under the names its checkpoint holds
    (model.embed_tokens.weight, lm_head.weight), not only transformers 5's model.language_model.*."""
    from lightning_merge.tools.tokenizer_merge import token_indexed_names

    folder = _qwen2_vl_config(tmp_path / "vl", tie=False)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert token_indexed_names(folder, names) == {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("tokenizer", [False, True], ids=["plain", "tokenizer_source"])
def test_a_vision_language_model_tied_in_its_text_config_gives_an_untied_output(tmp_path, tokenizer):
    """transformers 5 takes a vision-language model's tie from its ``text_config`` when that says one (Qwen3-VL's
    configs do), over the top level's: a merge whose config comes from such a tied base unties it there too, so
    transformers loads the merged LM head, not a copy of the embedding (with tokenizer merging too, which rewrites
    ``text_config``'s vocab_size)."""
    from tokenizer_family import CORPUS, bpe_tokenizer
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from lightning_merge.cli.commands import main

    words = bpe_tokenizer(CORPUS, 200)
    n = len(words.get_vocab())
    tied = _qwen2_vl_config(tmp_path / "tied", tie=True, text_tie=True, vocab=n)
    untied = _qwen2_vl_config(tmp_path / "untied", tie=False, text_tie=False, vocab=n)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(untied)).save_pretrained(untied)
    tensors = {k: v.clone() for k, v in load_file(untied / "model.safetensors").items() if k != "lm_head.weight"}
    tensors["model.embed_tokens.weight"] += 0.1  # the base's embedding (its head) differs from the expert's head
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    if tokenizer:
        for folder in (tied, untied):
            words.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tied}\ndtype: float32\n"
                      + ("tokenizer_source: base\n" if tokenizer else "")
                      + f"models:\n  - {{model: {untied}, parameters: {{weight: 0.5}}}}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert config["text_config"]["vocab_size"] == n and config["text_config"]["num_hidden_layers"] == 1
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    embed, head = tensors["model.embed_tokens.weight"], load_file(untied / "model.safetensors")["lm_head.weight"]
    torch.testing.assert_close(loaded.lm_head.weight.detach(), embed + 0.5 * (head - embed))
    assert not torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)


def _llama4_config(folder, tie, text_tie):
    from transformers import Llama4Config

    folder.mkdir(parents=True)
    text = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "intermediate_size": 32, "intermediate_size_mlp": 32, "num_local_experts": 2,
            "interleave_moe_layer_step": 2, "vocab_size": 32, "tie_word_embeddings": text_tie}
    vision = {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 16, "projector_input_dim": 16,
              "projector_output_dim": 16}
    config = Llama4Config(text_config=text, vision_config=vision, architectures=["Llama4ForConditionalGeneration"],
                          tie_word_embeddings=tie).to_dict()
    config["text_config"]["tie_word_embeddings"] = text_tie  # written as given
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llama4s_embeddings_and_tie_are_its_checkpoints(tmp_path):
    """Llama 4: AutoModelForCausalLM builds its text decoder alone (Llama4ForCausalLM, model.*) from the composite
    config; the model of the checkpoint is Llama4ForConditionalGeneration (language_model.model.*,
    language_model.lm_head). transformers 5 ties its head by text_config's tie_word_embeddings alone; a checkpoint
    without the head is read tied when either level says true (mergekit's tied_names do not read the config), not
    when both say false."""
    from transformers import AutoConfig, Llama4ForConditionalGeneration

    from lightning_merge.tools.architectures import meta_model
    from lightning_merge.tools.tokenizer_merge import token_indexed_names

    embed_name, head_name = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    untied = _llama4_config(tmp_path / "untied", tie=False, text_tie=False)
    assert type(meta_model(untied, "test")).__name__ == "Llama4ForConditionalGeneration"
    names = [embed_name, head_name, "language_model.model.norm.weight", "vision_model.class_embedding"]
    assert token_indexed_names(untied, names) == {embed_name, head_name}
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(32, 16, generator=g)
    save_file({embed_name: embed + 1, head_name: embed - 1}, untied / "model.safetensors")
    for top, text in ((False, True), (True, False), (False, False)):
        folder = _llama4_config(tmp_path / f"{top}_{text}", tie=top, text_tie=text)
        with torch.device("meta"):
            model = Llama4ForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder))
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is text  # transformers'
        save_file({embed_name: embed}, folder / "model.safetensors")
        out = with_tied_tensors([(Expert(folder), folder), (Expert(untied), untied)], tmp_path / "r.yaml")
        assert isinstance(out[0], TiedExpert) is (top or text)
        if top or text:
            assert out[0].tied == {head_name: embed_name} and torch.equal(out[0].tensor(head_name), embed)
            assert untied_config(out[0]) == {"tie_word_embeddings": False,
                                             "text_config": {"tie_word_embeddings": False}}
