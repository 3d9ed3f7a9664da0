"""Parity with mergekit 0.1.5's ``modules`` (issue 31) on a tiny gated T5 (encoder, decoder and shared modules):
per-module ``models`` and ``slices``, module ``parameters`` between the slices' and the recipe's, gradients over each
module's own layers, a decoder re-stacked from two slices (its layer count written to ``config.json``); and on tiny
Qwen2-VLs (text decoder, vision tower, projector), with their configs as transformers 5 saves them and as the
published checkpoints lay them out. mergekit 0.1.5 stops on a transformers 5 Qwen2-VL config (it reads the text
decoder's layer count on the top level: "has no attribute num_hidden_layers"), so it runs there with its config reads
patched to ``text_config`` (``test_parity_mergekit.run_mergekit_many(..., text_config=True)``). The other
vision-language architectures are tested by value in tests/unit/tools/test_recipe_modules.py."""

import json
import shutil

import pytest
import torch
from test_parity_mergekit import MERGEKIT, mergekit_outputs, relative_error
from tokenizer_family import write_qwen2_vl_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A gated T5 (3 encoder and 2 decoder blocks) and two experts: the base plus small Gaussian deltas."""
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(root / "base")
    tensors = load_file(root / "base" / "model.safetensors")
    experts = []
    for i in range(2):
        g = torch.Generator().manual_seed(i + 1)
        shutil.copytree(root / "base", root / f"e{i}")
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
                  root / f"e{i}" / "model.safetensors", metadata={"format": "pt"})
        experts.append(root / f"e{i}")
    return root / "base", experts


RECIPES = {
    "ties_models_and_slices": lambda b, e: f"""
merge_method: ties
base_model: {b}
dtype: float32
parameters: {{density: 0.5}}
modules:
  encoder:
    models:
      - {{model: {e[0]}, parameters: {{weight: [0.2, 1.0]}}}}
      - {{model: {e[1]}, parameters: {{weight: 0.5}}}}
  decoder:
    parameters: {{density: 0.8}}
    slices:
      - sources:
          - {{model: {b}, layer_range: [0, 2]}}
          - {{model: {e[0]}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
          - {{model: {e[1]}, layer_range: [0, 2], parameters: {{weight: 0.9}}}}
  shared:
    models:
      - {{model: {e[0]}, parameters: {{weight: 1.0}}}}
      - {{model: {e[1]}, parameters: {{weight: 0.6}}}}
""",
    # module parameters with filters (one falls through to the next rule), a decoder of three blocks from two slices
    "task_arithmetic_restacked": lambda b, e: f"""
merge_method: task_arithmetic
base_model: {b}
dtype: float32
parameters: {{lambda: 0.9}}
modules:
  encoder:
    parameters: {{weight: [{{filter: SelfAttention, value: [0.1, 0.7]}}, {{value: 0.8}}]}}
    models:
      - {{model: {e[0]}}}
      - {{model: {e[1]}, parameters: {{weight: 0.5}}}}
  decoder:
    parameters: {{weight: 0.4}}
    slices:
      - sources:
          - {{model: {b}, layer_range: [1, 2]}}
          - {{model: {e[0]}, layer_range: [1, 2], parameters: {{weight: 0.3}}}}
          - {{model: {e[1]}, layer_range: [1, 2]}}
      - sources:
          - {{model: {b}, layer_range: [0, 2]}}
          - {{model: {e[1]}, layer_range: [0, 2]}}
          - {{model: {e[0]}, layer_range: [0, 2], parameters: {{weight: [1.0, 0.0]}}}}
  shared:
    models:
      - {{model: {e[0]}, parameters: {{weight: 1.0}}}}
      - {{model: {e[1]}, parameters: {{weight: 0.6}}}}
""",
}


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, t5):
    base, experts = t5
    return mergekit_outputs(tmp_path_factory.mktemp("mk_modules"),
                            {case: make(base, experts) for case, make in RECIPES.items()})


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_modules_give_mergekits_model(tmp_path, theirs, case):
    recipe, mk = theirs[case]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    worst = relative_error(Expert(tmp_path / "lm"), Expert(mk))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"
    mine, mk_config = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "lm", mk))
    assert mine["num_decoder_layers"] == mk_config["num_decoder_layers"] == \
        (3 if case == "task_arithmetic_restacked" else 2)
    assert mine["num_layers"] == mk_config["num_layers"] == 3


#: a Qwen2-VL's three modules: the text decoder over every model (a gradient), the vision tower re-stacked from one
#: block of each model (its depth written to ``vision_config.depth``), the projector without the base's weight
VL_RECIPES = {
    "vl_ties": lambda b, e: f"""
merge_method: ties
base_model: {b}
dtype: float32
parameters: {{density: 0.5}}
modules:
  text_decoder:
    models:
      - {{model: {e[0]}, parameters: {{weight: [0.2, 0.7]}}}}
      - {{model: {e[1]}, parameters: {{weight: 0.4}}}}
  vision_tower:
    slices:
      - sources:
          - {{model: {b}, layer_range: [0, 1]}}
          - {{model: {e[0]}, layer_range: [1, 2], parameters: {{weight: 0.5}}}}
          - {{model: {e[1]}, layer_range: [0, 1], parameters: {{weight: 0.5}}}}
  multi_modal_projector:
    parameters: {{density: 0.8}}
    models:
      - {{model: {e[0]}, parameters: {{weight: 1.0}}}}
      - {{model: {e[1]}, parameters: {{weight: 0.3}}}}
""",
}


@pytest.fixture(scope="module", params=["saved", "flat"])
def vl_theirs(request, tmp_path_factory):
    base, experts = write_qwen2_vl_family(tmp_path_factory.mktemp("qwen2vl"), flat=request.param == "flat")
    return mergekit_outputs(tmp_path_factory.mktemp("mk_modules_vl"),
                            {case: make(base, experts) for case, make in VL_RECIPES.items()}, text_config=True)


@pytest.mark.parametrize("case", sorted(VL_RECIPES))
def test_modules_of_a_vision_language_model_give_mergekits_model(tmp_path, vl_theirs, case):
    from transformers import AutoConfig

    recipe, mk = vl_theirs[case]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    ours, theirs = Expert(tmp_path / "lm"), Expert(mk)
    assert sorted(ours.names()) == sorted(theirs.names())
    worst = relative_error(ours, theirs)
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"
    configs = [AutoConfig.from_pretrained(p) for p in (tmp_path / "lm", mk)]
    assert [c.vision_config.depth for c in configs] == [1, 1]
    assert [c.text_config.num_hidden_layers for c in configs] == [2, 2]
