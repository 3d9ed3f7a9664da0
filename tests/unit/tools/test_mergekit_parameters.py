"""mergekit's parameter settings resolved per tensor (gradients over layers, filter rules and their fallbacks), as
mergekit 0.1.5's ``evaluate_setting`` and planner resolve them; recipes that use them build a PerTensor table.
Parity with mergekit itself: tests/integration/parity/test_parity_mergekit.py."""

import json
import textwrap

import pytest
import torch
from conftest import make_models
from safetensors.torch import save_file

from lightning_merge import merge
from lightning_merge.strategies import PerTensor, TaskArithmetic, Ties
from lightning_merge.tools import mergekit_parameters as mp
from lightning_merge.tools.recipe import load_recipe


def test_gradients_interpolate_numbers_and_pick_other_values():
    assert mp.interpolate([0.2, 0.5, 0.8], 0.0) == 0.2
    assert mp.interpolate([0.2, 0.5, 0.8], 1.0) == 0.8
    assert mp.interpolate([0.2, 0.5, 0.8], 1 / 3) == pytest.approx(0.4)  # s = 2/3 between 0.2 and 0.5
    assert mp.interpolate([0.0, 1.0], 2 / 3) == pytest.approx(2 / 3)
    assert mp.interpolate([True, False], 0.4) is True and mp.interpolate([True, False], 1.0) is False
    assert mp.interpolate(["a", "b", "c"], 0.9) == "b"  # int(0.9·2) = 1


def test_layer_position_is_mergekits_t():
    assert mp.layer_position("model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(2 / 3)
    assert mp.layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: t = 1
    assert mp.layer_position("model.embed_tokens.weight", 4) == 0.0  # outside the layers: t = 0
    assert mp.layer_position("lm_head.weight", 4) == 0.0


def test_filters_take_the_first_match_and_fall_back_when_none_matches():
    rules = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.1, 0.9]}]
    assert mp.evaluate(rules, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.3
    assert mp.evaluate(rules, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert mp.evaluate(rules, "model.norm.weight", 0.5) is None
    assert mp.evaluate({"filter": "*", "value": 2}, "x", 0) == 2
    assert mp.evaluate(rules + [{"value": 1.0}], "model.norm.weight", 0) == 1.0
    shared, per = mp.resolve({"density": 0.6}, [{"density": rules}, {}], "model.norm.weight", 0.0)
    assert shared == {"density": 0.6} and per == [{}, {}]  # the model's setting gives nothing: the recipe's applies


def test_layers_counted_from_config_or_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 7}))
    assert mp.count_layers(tmp_path, ["layers.1.w"]) == 7
    assert mp.count_layers(tmp_path / "model.safetensors", ["a.layers.1.w", "a.layers.4.w", "head"]) == 5
    assert mp.count_layers(None, ["head"]) is None


def test_a_recipe_with_gradients_and_filters_builds_one_strategy_per_tensor(tmp_path):
    base, experts = make_models(2)
    (tmp_path / "m").mkdir()
    save_file(base, tmp_path / "m" / "base.safetensors")
    for i, e in enumerate(experts):
        save_file(e, tmp_path / "m" / f"e{i}.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        merge_method: ties
        base_model: m/base.safetensors
        parameters: {density: [0.2, 0.8], lambda: [{filter: bias, value: 0.5}]}
        models:
          - {model: m/e0.safetensors, parameters: {weight: [1.0, 3.0]}}
          - {model: m/e1.safetensors, parameters: {weight: 0.5}}
        """))
    loaded = load_recipe(recipe)
    table = loaded.strategy
    assert isinstance(table, PerTensor)
    # two layers (0, 1): t = 0 for layer 0 and the non-layer buffer, t = 1 for layer 1
    assert table.strategy_of("layers.0.weight") == Ties(density=[0.2, 0.2], weights=[1.0, 0.5], election="weighted",
                                                        rescale="none", scale=1.0)
    assert table.strategy_of("layers.0.bias").scale == 0.5
    assert table.strategy_of("layers.1.weight") == Ties(density=[0.8, 0.8], weights=[3.0, 0.5], rescale="none")
    got = merge(loaded.experts, loaded.base, table)
    want = merge(loaded.experts, loaded.base, Ties(density=0.8, weights=[3.0, 0.5]))
    assert torch.equal(got["layers.1.weight"], want["layers.1.weight"])


def test_a_recipe_whose_settings_all_agree_builds_the_plain_strategy(tmp_path):
    base, experts = make_models(1)
    (tmp_path / "m").mkdir()
    save_file(base, tmp_path / "m" / "base.safetensors")
    save_file(experts[0], tmp_path / "m" / "e0.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: m/base.safetensors\n"
                      "models: [{model: m/e0.safetensors, parameters: {weight: [0.5, 0.5]}}]\n")
    assert load_recipe(recipe).strategy == TaskArithmetic(weights=[0.5], normalize=False, scale=1.0)
