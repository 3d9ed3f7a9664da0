"""Parity with mergekit 0.1.5's tokenizer merging (issue 31): ``tokenizer_source`` (base, union, a model) and
``tokenizer:`` (source, tokens, pad_to_multiple_of), with ``models`` and with ``slices``, on tiny float32 Llamas
whose tokenizers differ (tests/helpers/tokenizer_family.py). The output tokenizer has mergekit's tokens,
``config.json`` its vocabulary size, and every token's embedding and LM-head row is mergekit's row of that token
(ids of the tokens the base lacks can differ: mergekit's order of them follows set iteration). Runs when a mergekit
install is found (``MERGEKIT_YAML``)."""

import json

import pytest
import torch
from test_parity_mergekit import MERGEKIT, run_mergekit_many
from tokenizer_family import CHAT_TOKENS, RECIPES, TIED_RECIPES, tied_copy, write_tokenizer_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]

TOKEN_INDEXED = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tokenizer_family(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def tied_base(family, tmp_path_factory):
    base, _ = family
    return tied_copy(base, tmp_path_factory.mktemp("tied") / "base")


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, family, tied_base):
    """mergekit's output of every recipe (and of union_ties with a chat template), made in one mergekit process."""
    base, experts = family
    root = tmp_path_factory.mktemp("mergekit")
    texts = {case: make(base, experts) for case, make in RECIPES.items()}
    texts.update({case: make(tied_base, experts) for case, make in TIED_RECIPES.items()})
    texts["chat_template"] = texts["union_ties"] + "chat_template: chatml\n"
    pairs = []
    for case, text in texts.items():
        (root / f"{case}.yaml").write_text(text)
        pairs.append((root / f"{case}.yaml", root / case))
    run_mergekit_many(pairs)
    return {case: (root / f"{case}.yaml", root / case) for case in texts}


def _run_both(tmp_path, theirs, case):
    recipe, mk = theirs[case]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "lm", mk


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


@pytest.mark.parametrize("case", sorted(RECIPES) + sorted(TIED_RECIPES))
def test_tokenizer_merging_gives_mergekits_model(tmp_path, theirs, case):
    ours, theirs = _run_both(tmp_path, theirs, case)
    mine, mk = _vocab(ours), _vocab(theirs)
    assert set(mine) == set(mk)
    sizes = [json.loads((p / "config.json").read_text())["vocab_size"] for p in (ours, theirs)]
    assert sizes[0] == sizes[1]  # (the base's reserved entries past its rows stay past them, as in mergekit's)
    a, b = Expert(ours), Expert(theirs)
    assert sorted(a.names()) == sorted(b.names())
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


def test_a_tied_base_gives_an_untied_model_with_the_merged_head(tmp_path, theirs, tied_base):
    """With a tied base, the output config unties the embeddings, so transformers loads the merged LM head, not a copy
    of the embedding; the base's head in the merge was its embedding (task arithmetic's τ of the head is each
    expert's head minus the base's embedding)."""
    from transformers import LlamaForCausalLM

    ours, _ = _run_both(tmp_path, theirs, "tied_base_task_arithmetic")
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((tied_base / "config.json").read_text())["tie_word_embeddings"] is True  # the base untouched
    merged = Expert(ours)
    model = LlamaForCausalLM.from_pretrained(ours, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight.detach(), merged.tensor("lm_head.weight"))
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_the_merged_model_runs_with_its_tokenizer(tmp_path, theirs):
    """The merge with the union tokenizer loads in transformers and gives finite logits for text using tokens only
    one expert knew (a chat token of expert_0, a word of expert_1's tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    ours, _ = _run_both(tmp_path, theirs, "union_ties")
    tokenizer = AutoTokenizer.from_pretrained(ours)
    model = LlamaForCausalLM.from_pretrained(ours, dtype=torch.float32)
    ids = tokenizer(f"{CHAT_TOKENS[0]} curvature weighs the cat", return_tensors="pt").input_ids
    assert int(ids[0, 0]) == tokenizer.get_vocab()[CHAT_TOKENS[0]]
    assert model.get_input_embeddings().weight.shape[0] == json.loads((ours / "config.json").read_text())["vocab_size"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_the_chat_template_goes_into_the_merged_tokenizer(tmp_path, theirs):
    """With tokenizer merging, the recipe's chat template is the merged tokenizer's (as mergekit saves it)."""
    from transformers import AutoTokenizer

    ours, theirs = _run_both(tmp_path, theirs, "chat_template")
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    rendered = [AutoTokenizer.from_pretrained(p).apply_chat_template(messages, tokenize=False) for p in (ours, theirs)]
    assert rendered[0] == rendered[1] == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\nsat<|im_end|>\n"
