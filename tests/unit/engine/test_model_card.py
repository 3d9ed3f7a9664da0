"""What a folder output holds besides its weights: the README.md model card from the provenance, the files a merge
asks for (``files=``), and a recipe's ``slices`` layout and ``--out-shard-size`` (issue 31)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import Expert, merge
from lightning_merge._version import __version__
from lightning_merge.cli.commands import main, parse_kmb
from lightning_merge.engine.card import model_card
from lightning_merge.strategies import Ties
from lightning_merge.tools.recipe import load_recipe


def _folder(path, value, layers=3, readme=None):
    path.mkdir()
    tensors = {"model.embed_tokens.weight": torch.full((4, 2), value), "model.norm.weight": torch.full((2,), value),
               "lm_head.weight": torch.full((4, 2), -value)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.full((2, 2), value + i)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.full((2,), value * 10 + i)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


def test_model_card_says_what_made_the_model(tmp_path):
    base = _folder(tmp_path / "base", 1.0, readme="# The base model's own card\n")
    a, b = _folder(tmp_path / "a", 2.0), _folder(tmp_path / "b", 3.0)
    out = merge([a, b], base, Ties(density=0.5, weights=[1.0, 0.5]), tmp_path / "merged")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- merge\n- lightning-merge\n---\n# merged\n")
    assert f"made with lightning-merge {__version__}" in card
    assert "- method: `ties`" in card and '"density": 0.5' in card and '"weights": [1.0, 0.5]' in card
    assert f"- base: `{base}`" in card
    assert f"- `{a}`\n- `{b}`" in card
    assert "### Recipe" not in card and "The base model's own card" not in card  # the base's card is not this one's
    assert "README.md" in json.loads((out / "lightning_merge.json").read_text())["files"]
    assert (base / "README.md").read_text() == "# The base model's own card\n"  # inputs untouched


def test_files_set_json_keys_and_replace_texts(tmp_path):
    base = _folder(tmp_path / "base", 1.0)
    out = merge([_folder(tmp_path / "a", 2.0)], base, out=tmp_path / "m",
                files={"config.json": {"num_hidden_layers": 7}, "README.md": "mine\n", "notes.txt": "x"})
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "num_hidden_layers": 7,
                                                             "torch_dtype": "float32"}
    assert (out / "README.md").read_text() == "mine\n" and (out / "notes.txt").read_text() == "x"
    for bad in ({"../x": "t"}, {"model.safetensors": "t"}, {"a.txt": {"k": 1}}, {"lightning_merge.json": "{}"}):
        with pytest.raises(ValueError, match="files: "):
            merge([base], out=tmp_path / "n", files=bad)


def test_a_json_key_holding_an_object_gets_the_keys_given_under_it(tmp_path):
    """``{"text_config": {"vocab_size": 9}}`` changes that key of the base's ``text_config`` and keeps its others (a
    vision-language model's vocabulary size and tie live there)."""
    base = _folder(tmp_path / "base", 1.0)
    config = {"model_type": "qwen2_vl", "text_config": {"vocab_size": 4, "tie_word_embeddings": True, "rope": {"a": 1}}}
    (base / "config.json").write_text(json.dumps(config))
    out = merge([_folder(tmp_path / "a", 2.0)], base, out=tmp_path / "m", files={"config.json": {
        "tie_word_embeddings": False, "text_config": {"vocab_size": 9, "rope": {"b": 2}}, "model_type": "x"}})
    assert json.loads((out / "config.json").read_text()) == {
        "model_type": "x", "tie_word_embeddings": False, "torch_dtype": "float32",
        "text_config": {"vocab_size": 9, "tie_word_embeddings": True, "rope": {"a": 1, "b": 2}}}


def test_recipe_card_holds_the_recipe_and_a_url_without_its_secret(tmp_path):
    _folder(tmp_path / "a", 2.0)
    _folder(tmp_path / "b", 3.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nname: https://h/x?X-Amz-Signature=abc\n"
                      "models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 3}}]\n")
    assert main(["merge", str(recipe), str(tmp_path / "m"), "--no-progress"]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- mergekit\n" in card and "```yaml\nmerge_method: linear\n" in card and "abc" not in card
    assert (tmp_path / "m" / "mergekit_config.yml").read_text() == recipe.read_text().replace("abc", "***")
    merged = Expert(tmp_path / "m")
    torch.testing.assert_close(merged.tensor("model.norm.weight"), torch.full((2,), 2.75))


def test_model_card_escapes_backticks():
    card = model_card({"strategy": {"name": "linear"}, "experts": ["a`b"], "base": None, "version": "1"}, "x")
    assert "- `a'b`" in card and "- base: none" in card and "merge of 1 model made" in card


def test_passthrough_slices_stack_layers(tmp_path):
    """Output layer j is the planned source layer; embeddings from the first slice's model, norm and head from the
    last slice's; config.json counts the output layers."""
    _folder(tmp_path / "a", 1.0)
    _folder(tmp_path / "b", 5.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: passthrough\nslices:\n"
                      "  - sources: [{model: a, layer_range: [0, 2]}]\n"
                      "  - sources: [{model: b, layer_range: [1, 3]}]\n"
                      "    parameters: {scale: [{filter: up_proj, value: [2.0, 4.0]}]}\n")
    loaded = load_recipe(recipe)
    assert loaded.files["config.json"] == {"num_hidden_layers": 4}
    assert main(["merge", str(recipe), str(tmp_path / "m"), "--no-progress"]) == 0
    m = Expert(tmp_path / "m")
    up = [float(m.tensor(f"model.layers.{j}.mlp.up_proj.weight")[0, 0]) for j in range(4)]
    assert up == [1.0, 2.0, 2.0 * 6.0, 4.0 * 7.0]  # a's 0, 1; b's 1, 2 scaled along the slice's gradient
    norms = [float(m.tensor(f"model.layers.{j}.input_layernorm.weight")[0]) for j in range(4)]
    assert norms == [10.0, 11.0, 51.0, 52.0]
    assert float(m.tensor("model.embed_tokens.weight")[0, 0]) == 1.0
    assert float(m.tensor("lm_head.weight")[0, 0]) == -5.0 and float(m.tensor("model.norm.weight")[0]) == 5.0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 4
    assert "slices: " in json.loads((tmp_path / "m" / "lightning_merge.json").read_text())["experts"][0]


def test_out_shard_size_is_mergekits(tmp_path):
    assert parse_kmb("5B") == 5_000_000_000 and parse_kmb("300M") == 300_000_000 and parse_kmb("120") == 120
    with pytest.raises(ValueError, match="--out-shard-size '5GB'"):
        parse_kmb("5GB")
    _folder(tmp_path / "a", 2.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    assert main(["merge", str(recipe), str(tmp_path / "m"), "--no-progress", "--out-shard-size", "100"]) == 0
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    assert main(["merge", str(recipe), str(tmp_path / "n"), "--out-shard-size", "1K", "--shard-size", "1KB"]) == 2
