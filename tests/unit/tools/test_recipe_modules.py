"""mergekit's ``modules`` on a Qwen2-VL-shaped checkpoint (mergekit's tensor names: text decoder, vision tower and
projector), checked by value: each module merged with its own models, slices and parameters, its layers renumbered,
its layer count in config.json; and the refusals."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import Expert, merge
from lightning_merge.errors import RecipeError
from lightning_merge.tools.recipe import load_recipe
from lightning_merge.tools.recipe_modules import ARCHITECTURE_MODULES, module_of

H, E = 8, 4


def _names(layers=2, depth=3):
    t = {"model.embed_tokens.weight": (16, H), "model.norm.weight": (H,), "lm_head.weight": (16, H),
         "visual.patch_embed.proj.weight": (E, 3), "visual.merger.ln_q.weight": (E,),
         "visual.merger.mlp.0.weight": (E, E), "visual.merger.mlp.2.weight": (H, E)}
    for i in range(layers):
        t.update({f"model.layers.{i}.self_attn.q_proj.weight": (H, H), f"model.layers.{i}.self_attn.q_proj.bias": (H,),
                  f"model.layers.{i}.input_layernorm.weight": (H,)})
    for i in range(depth):
        t.update({f"visual.blocks.{i}.attn.qkv.weight": (3 * E, E), f"visual.blocks.{i}.norm1.weight": (E,)})
    return t


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl")
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "num_hidden_layers": 2,
              "hidden_size": H, "vision_config": {"depth": 3, "embed_dim": E}}
    g = torch.Generator().manual_seed(0)
    folders = []
    for name in ("base", "e0", "e1"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        tensors = {n: torch.randn(s, generator=g) for n, s in _names().items()}
        tensors["rotary.inv_freq"] = torch.ones(2)  # owned by no module
        save_file(tensors, root / name / "model.safetensors")
        folders.append(root / name)
    return folders


def test_every_tensor_belongs_to_the_module_owning_its_longest_prefix():
    specs = ARCHITECTURE_MODULES["Qwen2VLForConditionalGeneration"]
    assert module_of("visual.merger.mlp.0.weight", specs) == "multi_modal_projector"
    assert module_of("visual.blocks.2.norm1.weight", specs) == "vision_tower"
    assert module_of("lm_head.weight", specs) == "text_decoder"
    assert module_of("model.layers.0.input_layernorm.weight", specs) == "text_decoder"
    assert module_of("rotary.inv_freq", specs) is None


def test_each_module_merges_its_own_models_slices_and_parameters(tmp_path, vl, caplog):
    base, e0, e1 = vl
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
merge_method: linear
dtype: float32
parameters: {{weight: 1.0}}
modules:
  text_decoder:
    models:
      - {{model: {e0}, parameters: {{weight: 0.25}}}}
      - {{model: {e1}, parameters: {{weight: 0.75}}}}
  vision_tower:
    slices:
      - sources:
          - {{model: {e0}, layer_range: [0, 2]}}
          - {{model: {e1}, layer_range: [1, 3]}}
  multi_modal_projector:
    parameters: {{weight: [{{filter: mlp.2, value: 0.5}}]}}
    models:
      - {{model: {e0}}}
      - {{model: {e1}, parameters: {{weight: 0.0}}}}
""")
    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        loaded = load_recipe(recipe)
    assert "rotary.inv_freq" in caplog.text and "belong to no module" in caplog.text
    out = merge(loaded.experts, loaded.base, loaded.strategy, out=None)
    a, b = Expert(e0), Expert(e1)
    assert "rotary.inv_freq" not in out
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "lm_head.weight"):
        torch.testing.assert_close(out[name], 0.25 * a.tensor(name) + 0.75 * b.tensor(name))
    assert not any(n.startswith("visual.blocks.2.") for n in out)  # two output blocks: e0's j and e1's j + 1
    for j in range(2):
        torch.testing.assert_close(out[f"visual.blocks.{j}.attn.qkv.weight"],
                                   0.5 * a.tensor(f"visual.blocks.{j}.attn.qkv.weight")
                                   + 0.5 * b.tensor(f"visual.blocks.{j + 1}.attn.qkv.weight"))
    torch.testing.assert_close(out["visual.patch_embed.proj.weight"],  # the embedding: the first slice's sources
                               0.5 * a.tensor("visual.patch_embed.proj.weight")
                               + 0.5 * b.tensor("visual.patch_embed.proj.weight"))
    # the projector: e1's weight 0 wins over the module's (source first); e0's falls to the module's filter on
    # mlp.2 (0.5) and, elsewhere, to the recipe's 1.0; linear normalises the weights
    torch.testing.assert_close(out["visual.merger.mlp.2.weight"], a.tensor("visual.merger.mlp.2.weight"))
    torch.testing.assert_close(out["visual.merger.ln_q.weight"], a.tensor("visual.merger.ln_q.weight"))
    assert loaded.files["config.json"] == {"num_hidden_layers": 2, "vision_config": {"depth": 2, "embed_dim": E}}


def _recipe(tmp_path, vl, modules_text):
    base, e0, e1 = vl
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                      + modules_text.format(e0=e0, e1=e1))
    return recipe


def test_a_module_the_architecture_lacks_or_one_left_out_is_refused(tmp_path, vl):
    one = "  {name}:\n    models: [{{{{model: {{e0}}, parameters: {{{{weight: 1.0}}}}}}}}]\n"
    every = "".join(one.format(name=m) for m in ("text_decoder", "vision_tower", "multi_modal_projector"))
    with pytest.raises(RecipeError, match="names audio_tower, which Qwen2VLForConditionalGeneration does not have"):
        load_recipe(_recipe(tmp_path, vl, "modules:\n" + every + one.format(name="audio_tower")))
    with pytest.raises(RecipeError, match="leaves out vision_tower, multi_modal_projector of Qwen2VL"):
        load_recipe(_recipe(tmp_path, vl, "modules:\n" + one.format(name="text_decoder")))
    with pytest.raises(RecipeError, match="exactly one of the three"):
        load_recipe(_recipe(tmp_path, vl, "models: [{{model: {e0}}}]\nmodules:\n" + every))
    with pytest.raises(RecipeError, match="modules.vision_tower must give either 'models' or 'slices'"):
        load_recipe(_recipe(tmp_path, vl, "modules:\n  vision_tower: {{parameters: {{weight: 1}}}}\n"))
    with pytest.raises(RecipeError, match="'modules' merges with one of mergekit's methods; 'fisher' is this "
                                          "project's .*statistics"):
        fisher = _recipe(tmp_path, vl, "modules:\n" + every)
        fisher.write_text(fisher.read_text().replace("task_arithmetic", "fisher"))
        load_recipe(fisher)
    with pytest.raises(RecipeError, match="tokenizer merging .* with 'modules' is not implemented"):
        load_recipe(_recipe(tmp_path, vl, "tokenizer_source: base\nmodules:\n" + every))


def test_an_architecture_without_modules_is_named(tmp_path):
    from lightning_merge.tools.testing import llama_config, write_llama_family

    base, experts = write_llama_family(tmp_path / "llama", llama_config(hidden=16, layers=1, intermediate=32, vocab=32),
                                       n_experts=1, dtype=torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodules:\n  text_decoder:\n"
                      f"    models: [{{model: {experts[0]}, parameters: {{weight: 1.0}}}}]\n")
    with pytest.raises(RecipeError, match="is a LlamaForCausalLM, which has one stack of layers"):
        load_recipe(recipe)


def _t5_folder(folder, config, g, encoder=3, decoder=3):
    """A T5-shaped checkpoint (mergekit's T5 names): encoder and decoder blocks, shared embedding, final norms."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    t = {"shared.weight": torch.randn(16, H, generator=g),
         "encoder.final_layer_norm.weight": torch.randn(H, generator=g),
         "decoder.final_layer_norm.weight": torch.randn(H, generator=g)}
    for stack, n in (("encoder", encoder), ("decoder", decoder)):
        for i in range(n):
            t[f"{stack}.block.{i}.layer.0.SelfAttention.q.weight"] = torch.randn(H, H, generator=g)
    save_file(t, folder / "model.safetensors")
    return folder


def test_a_restacked_decoder_is_counted_under_its_own_key_when_the_config_leaves_it_to_the_encoders(tmp_path):
    """A T5 config without ``num_decoder_layers`` (transformers then takes ``num_layers`` for both stacks): the
    decoder's new count goes to ``num_decoder_layers``, as mergekit writes it; ``num_layers`` stays the encoder's
    (writing it there would drop encoder blocks on load)."""
    config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "num_layers": 3, "d_model": H}
    g = torch.Generator().manual_seed(0)
    base, e0 = (_t5_folder(tmp_path / n, config, g) for n in ("base", "e0"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
merge_method: task_arithmetic
base_model: {base}
modules:
  encoder: {{models: [{{model: {e0}, parameters: {{weight: 1.0}}}}]}}
  decoder:
    slices: [{{sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {e0}, layer_range: [1, 3],
                                                                   parameters: {{weight: 1.0}}}}]}}]
  shared: {{models: [{{model: {e0}, parameters: {{weight: 1.0}}}}]}}
""")
    assert load_recipe(recipe).files["config.json"] == {"num_layers": 3, "num_decoder_layers": 2}


def test_a_layer_count_held_at_the_top_and_in_the_text_config_is_set_in_both(tmp_path, vl):
    """A Qwen2-VL config holding ``num_hidden_layers`` at the top level and in ``text_config`` (transformers 5
    reads the latter): both get the text decoder's output count."""
    base, e0, e1 = vl
    folders = []
    for source in (e0, e1):
        folder = tmp_path / source.name
        folder.mkdir()
        config = json.loads((source / "config.json").read_text())
        config["text_config"] = {"num_hidden_layers": 2, "hidden_size": H}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
        folders.append(folder)
    a, b = folders
    one = "{{models: [{{model: {a}, parameters: {{weight: 1.0}}}}, {{model: {b}, parameters: {{weight: 1.0}}}}]}}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
merge_method: linear
parameters: {{weight: 1.0}}
modules:
  text_decoder:
    slices: [{{sources: [{{model: {a}, layer_range: [0, 1]}}, {{model: {b}, layer_range: [1, 2]}}]}}]
  vision_tower: {one.format(a=a, b=b)}
  multi_modal_projector: {one.format(a=a, b=b)}
""")
    config = load_recipe(recipe).files["config.json"]
    assert config["num_hidden_layers"] == 1 and config["text_config"] == {"num_hidden_layers": 1, "hidden_size": H}
    assert config["vision_config"]["depth"] == 3
