"""Parity with mergekit 0.1.5's tokenizer merging on a vision-language model (issue 31): tiny float32 Qwen2-VLs
(``Qwen2VLForConditionalGeneration`` as transformers saves it) whose tokenizers differ as in
test_parity_mergekit_tokenizer.py's Llamas (tests/helpers/tokenizer_family.py). The text decoder's embeddings and
LM head are aligned to the output tokenizer; the vision tower and projector merge as they are. Every tensor equals
mergekit's (token-indexed rows compared token by token), and the output loads as
``Qwen2VLForConditionalGeneration`` with its tokenizer. The configs are laid out both as transformers 5 saves them
(``text_config``) and as Qwen2-VL's published checkpoints have them (the text decoder's keys at the top level).

mergekit 0.1.5 cannot read a Qwen2-VL config of transformers 5 on its own: its Qwen2-VL definition reads the text
decoder's layer count and the vocabulary size as ``num_hidden_layers`` and ``vocab_size`` on the top-level config
(transformers 4 kept them there), and transformers 5's ``Qwen2VLConfig`` holds them in ``text_config`` only (it
moves a published checkpoint's top-level keys there when it reads the config), so
its planning stops with ``RuntimeError: Config Qwen2VLConfig {...} has no attribute num_hidden_layers``
(``mergekit/common.py``, ``get_config_value``). The reference runs mergekit with ``get_config_value`` and
``set_config_value`` patched to use ``text_config`` for a plain key the top level lacks and ``text_config`` has, and
nothing else (``test_parity_mergekit.run_mergekit_many(..., text_config=True)``). Runs when a mergekit install is found
(``MERGEKIT_YAML``)."""

import os
import subprocess

import pytest
import torch
from test_parity_mergekit import MERGEKIT, mergekit_outputs
from test_parity_mergekit_tokenizer import RECIPES, TIED_RECIPES
from tokenizer_family import CHAT_TOKENS, tied_copy, write_vl_tokenizer_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]

TOKEN_INDEXED = ("model.embed_tokens.weight", "lm_head.weight")

#: the recipes over ``models`` (layer slices of a model with several stacks are refused: they take ``modules``)
CASES = ("union_ties", "base_task_arithmetic", "model_linear_no_base", "tokens_and_padding", "slerp_union")


@pytest.fixture(scope="module", params=["saved", "flat"])
def family(request, tmp_path_factory):
    """The Qwen2-VLs with their configs as transformers 5 saves them (``text_config``), and as the published
    checkpoints have them (``flat``: the text decoder's keys at the top level)."""
    return write_vl_tokenizer_family(tmp_path_factory.mktemp("vl"), flat=request.param == "flat")


@pytest.fixture(scope="module")
def tied_base(family, tmp_path_factory):
    base, _ = family
    return tied_copy(base, tmp_path_factory.mktemp("vl_tied") / "base")


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, family, tied_base):
    """mergekit's output of every recipe, made in one mergekit process, its config reads patched."""
    base, experts = family
    texts = {case: RECIPES[case](base, experts) for case in CASES}
    texts.update({case: make(tied_base, experts) for case, make in TIED_RECIPES.items()})
    return mergekit_outputs(tmp_path_factory.mktemp("mergekit_vl"), texts, text_config=True)


def _ours(tmp_path, theirs, case):
    recipe, mk = theirs[case]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "lm", mk


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _vocab_size(folder):
    """The vocabulary size transformers reads from a Qwen2-VL's config.json (its text_config's)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).text_config.vocab_size


def test_mergekit_cannot_read_the_config_unpatched(tmp_path, family):
    """Why the reference is patched: mergekit 0.1.5 as installed stops on the config's layer count."""
    base, experts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["union_ties"](base, experts))
    run = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "RuntimeError: Config Qwen2VLConfig" in run.stderr and "has no attribute num_hidden_layers" in run.stderr


@pytest.mark.parametrize("case", CASES + tuple(sorted(TIED_RECIPES)))
def test_vl_tokenizer_merging_gives_mergekits_model(tmp_path, theirs, case):
    ours, theirs = _ours(tmp_path, theirs, case)
    mine, mk = _vocab(ours), _vocab(theirs)
    assert set(mine) == set(mk)
    sizes = [_vocab_size(p) for p in (ours, theirs)]
    assert sizes[0] == sizes[1]
    a, b = Expert(ours), Expert(theirs)
    assert sorted(a.names()) == sorted(b.names())
    assert any(n.startswith("visual.merger.") for n in a.names()) and any(n.startswith("visual.blocks.")
                                                                          for n in a.names())
    worst = 0.0
    for name in a.names():
        x, y = a.tensor(name), b.tensor(name)
        assert x.shape == y.shape, name
        if name in TOKEN_INDEXED:  # row of each token against mergekit's row of that token; padding rows as they are
            tokens = [t for t in sorted(mine, key=mine.get) if mine[t] < sizes[0]]
            assert all(mk[t] < sizes[0] for t in tokens)
            y = torch.cat([y[torch.tensor([mk[t] for t in tokens])], y[len(tokens):]])
        worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"


@pytest.mark.parametrize("case", ["union_ties", "tied_base_union_ties"])
def test_the_merged_vl_model_loads_and_runs_with_its_tokenizer(tmp_path, theirs, case):
    """The merge loads as Qwen2VLForConditionalGeneration with the merged weights (the LM head its own, also from a
    tied base), its tokenizer loads, and text with tokens only one expert knew gives finite logits."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    ours, _ = _ours(tmp_path, theirs, case)
    tokenizer = AutoTokenizer.from_pretrained(ours)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ours, dtype=torch.float32)
    merged = Expert(ours)
    assert torch.equal(model.lm_head.weight.detach(), merged.tensor("lm_head.weight"))
    assert torch.equal(model.get_input_embeddings().weight.detach(), merged.tensor("model.embed_tokens.weight"))
    assert torch.equal(model.model.visual.merger.mlp[0].weight.detach(), merged.tensor("visual.merger.mlp.0.weight"))
    ids = tokenizer(f"{CHAT_TOKENS[0]} curvature weighs the cat", return_tensors="pt").input_ids
    assert int(ids[0, 0]) == tokenizer.get_vocab()[CHAT_TOKENS[0]]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
