"""The vocabulary alignment's rules (lightning_merge/sources/vocabulary.py), value by value on hand-made vocabularies,
and the recipe's tokenizer keys as they are parsed (tools/tokenizer_merge.py). mergekit parity on real tokenizers:
tests/integration/parity/test_parity_mergekit_tokenizer.py."""

from pathlib import Path

import pytest
import torch

from lightning_merge import Expert
from lightning_merge.errors import RecipeError
from lightning_merge.sources.vocabulary import TokenSource, VocabularyAlignment, VocabularyPlan, positions_of
from lightning_merge.tools.tokenizer_merge import TokenEntry, parse_tokenizer

# output tokens: a (in all), b (only model 2), c (none), d (base and model 1), e (models 1 and 2), f (all, forced 0)
VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5}
MODEL_VOCABS = [{"a": 0, "d": 1, "f": 2}, {"f": 0, "e": 1, "d": 2, "a": 3}, {"e": 0, "b": 1, "a": 2, "f": 3}]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(len(v) + 1, 3, generator=g) for v in MODEL_VOCABS]  # one spare row each


def _plan(size=6, tokens=None, base=0):
    positions = [positions_of(VOCAB, v, len(v)) for v in MODEL_VOCABS]
    return VocabularyPlan(models=["base", "one", "two"], vocabulary=VOCAB, positions=positions, size=size,
                          tokens=tokens or {}, base=base, names=frozenset({"emb"}))


def test_positions_mark_missing_tokens_and_ids_past_the_rows():
    assert positions_of(VOCAB, MODEL_VOCABS[1], 4).tolist() == [3, -1, -1, 2, 1, 0]
    assert positions_of(VOCAB, MODEL_VOCABS[1], 2).tolist() == [-1, -1, -1, -1, 1, 0]  # ids 2, 3 have no row


def test_each_missing_token_takes_mergekits_default_row():
    t = _tensors()
    out = _plan(tokens={"f": TokenSource(model=None, force=True)}).align("emb", t)
    base, one, two = t
    for m, aligned in enumerate(out):
        own = t[m]
        vocab = MODEL_VOCABS[m]
        assert aligned.shape == (6, 3)
        torch.testing.assert_close(aligned[0], own[vocab["a"]], rtol=0, atol=0)  # everyone's own row
        torch.testing.assert_close(aligned[1], two[1], rtol=0, atol=0)  # one model has it: that model's
        assert aligned[2].abs().max() == 0  # nobody has it: zeros
        expected_d = own[vocab["d"]] if "d" in vocab else base[1]  # the base has it: the base's, where missing
        torch.testing.assert_close(aligned[3], expected_d, rtol=0, atol=0)
        expected_e = own[vocab["e"]] if "e" in vocab else (one[1] + two[0]) / 2  # several, not the base: average
        torch.testing.assert_close(aligned[4], expected_e, rtol=0, atol=0)
        assert aligned[5].abs().max() == 0  # forced to zero in every model, though all have it


def test_without_a_base_the_average_applies_and_padding_is_each_models_mean_row():
    t = _tensors()
    out = _plan(size=8, base=None).align("emb", t)
    base, one, two = t
    torch.testing.assert_close(out[2][3], (base[1] + one[2]) / 2, rtol=0, atol=0)  # d: base and one, no base rule
    for aligned in out:
        assert aligned.shape == (8, 3)
        torch.testing.assert_close(aligned[6], aligned[:6].mean(0), rtol=0, atol=0)
        torch.testing.assert_close(aligned[7], aligned[:6].mean(0), rtol=0, atol=0)


def test_entries_name_a_models_row_or_another_token_and_dtypes_promote():
    t = _tensors()
    t[1] = t[1].to(torch.bfloat16)
    plan = _plan(tokens={"c": TokenSource(model=1, row=1), "b": TokenSource(model=0, row=2, force=True)})
    out = plan.align("emb", t)
    assert all(a.dtype == torch.float32 for a in out)
    for aligned in out:
        torch.testing.assert_close(aligned[2], t[1][1].float(), rtol=0, atol=0)
        torch.testing.assert_close(aligned[1], t[0][2], rtol=0, atol=0)


def test_an_entry_from_a_model_lacking_the_token_is_refused_by_name():
    plan = _plan(tokens={"b": TokenSource(model=0)})
    with pytest.raises(ValueError, match=r"token 'b' .* model 'base', whose tokenizer lacks it"):
        plan.align("emb", _tensors())


def test_statistics_follow_the_rows_and_are_zero_where_a_model_lacks_the_token():
    plan = _plan(size=7)
    value = torch.arange(1.0, 5.0).unsqueeze(1).expand(4, 2)  # model 1's rows f e d a
    out = plan.align_statistic(1, value)
    assert out[:, 0].tolist() == [4.0, 0.0, 0.0, 3.0, 2.0, 1.0, 0.0]


def test_aligned_experts_read_like_experts_of_the_output_vocabulary():
    t = _tensors()
    experts = [Expert({"emb": x, "w": torch.full((2,), float(i))}, name=f"m{i}") for i, x in enumerate(t)]
    alignment = VocabularyAlignment(_plan(), experts)
    one = alignment.expert(1)
    assert one.spec("emb").shape == (6, 3) and one.spec("w").shape == (2,)
    torch.testing.assert_close(one.tensor("emb"), _plan().align("emb", t)[1], rtol=0, atol=0)
    torch.testing.assert_close(one.tensor("emb", rows=(2, 5)), _plan().align("emb", t)[1][2:5], rtol=0, atol=0)
    assert one.tensor("w").tolist() == [1.0, 1.0]
    assert one.subset(["emb"]).names() == ["emb"]


def test_the_plan_refuses_inconsistent_tables():
    with pytest.raises(ValueError, match="positions of model 'one'"):
        VocabularyPlan(models=["base", "one"], vocabulary=VOCAB, positions=[torch.zeros(6, dtype=torch.long),
                                                                            torch.zeros(5, dtype=torch.long)], size=6)
    with pytest.raises(ValueError, match="6 tokens but size 5"):
        _plan(size=5)


def _resolve(ref, where):
    return Path("/models") / str(ref)


def test_recipe_tokenizer_keys_parse_as_mergekit_reads_them():
    recipe = Path("r.yaml")
    assert parse_tokenizer({}, recipe, _resolve) is None
    assert parse_tokenizer({"tokenizer_source": "union"}, recipe, _resolve).source == "union"
    assert parse_tokenizer({"tokenizer_source": "m1"}, recipe, _resolve).source == Path("/models/m1")
    spec = parse_tokenizer({"tokenizer": {"pad_to_multiple_of": 32, "tokens": {
        "<a>": {"source": "m1"}, "<b>": {"source": {"kind": "zero"}, "force": True},
        "<c>": {"source": {"kind": "model_token", "model": "m2", "token_id": 4}},
        "<d>": {"source": {"kind": "model_token", "model": "m2", "token": "</s>"}}}}}, recipe, _resolve)
    assert spec.source == "union" and spec.pad_to_multiple_of == 32  # mergekit's default source is the union
    assert spec.tokens == {"<a>": TokenEntry(Path("/models/m1")), "<b>": TokenEntry("zero", True),
                           "<c>": TokenEntry((Path("/models/m2"), 4)), "<d>": TokenEntry((Path("/models/m2"), "</s>"))}


@pytest.mark.parametrize("config, message", [
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "either 'tokenizer_source' or 'tokenizer'"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of must be a positive integer"),
    ({"tokenizer": {"sorce": "base"}}, "unknown key"),
    ({"tokenizer": {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "m"}}}}}, "token_id: N"),
    ({"tokenizer": {"tokens": {"<a>": {}}}}, "has no source"),
    ({"tokenizer_source": 3}, "'base', 'union' or a model"),
    ({"tokenizer": {"tokens": ["<a>"]}}, r"tokenizer.tokens must be a mapping of token"),  # was an AttributeError
    ({"tokenizer": {"tokens": "<a>"}}, r"tokenizer.tokens must be a mapping of token"),
    ({"tokenizer": {"tokens": {5: {"source": {"kind": "zero"}}}}}, r"tokens\[5\]: a token must be a string"),
])
def test_bad_tokenizer_keys_are_refused_naming_the_key(config, message):
    with pytest.raises(RecipeError, match=message):
        parse_tokenizer(config, Path("r.yaml"), _resolve)


def test_the_configs_token_ids_are_renumbered_to_the_output_tokenizers():
    """A vision-language model finds its image tokens in input_ids by the ids its config names: with a tokenizer
    that numbers them its own way, the output's config names the output's ids (the donor's token of each id)."""
    from lightning_merge.tools.tokenizer_merge import _renumbered_token_ids

    donor = {"<s>": 0, "</s>": 1, "a": 2, "<image>": 3, "<boi>": 4}
    output = {"<s>": 0, "</s>": 1, "<image>": 2, "a": 3, "<boi>": 5, "b": 4}
    config = {"image_token_index": 3, "boi_token_id": 4, "bos_token_id": 0, "eos_token_id": [1, 3],
              "video_token_id": 151656, "pad_token_id": None, "vocab_size": 5, "mm_tokens_per_image": 3,
              "text_config": {"image_token_id": 3, "eos_token_id": 1, "vocab_size": 5}}
    assert _renumbered_token_ids(config, donor, output) == {
        "image_token_index": 2, "boi_token_id": 5, "eos_token_id": [1, 2], "text_config": {"image_token_id": 2}}
    assert _renumbered_token_ids(config, donor, donor) == {}  # the donor's own tokenizer: nothing changes
    assert _renumbered_token_ids(config, donor, {"<s>": 0, "</s>": 1}) == {}  # tokens the output lacks: kept


def test_token_ids_in_nested_configs_are_renumbered_except_in_a_vocabulary_of_their_own():
    """An omni model names its image and audio tokens under thinker_config (and its text_config), a vision tower
    under vision_config; its speech talker numbers codec tokens in a vocabulary of its own (another vocab_size),
    which the tokenizer does not name: those ids are kept."""
    from lightning_merge.tools.tokenizer_merge import _renumbered_token_ids

    donor = {"<s>": 0, "</s>": 1, "a": 2, "<image>": 3, "<audio>": 4}
    output = {"<s>": 0, "</s>": 1, "<image>": 2, "a": 3, "<audio>": 5, "b": 4}
    config = {"thinker_config": {"image_token_index": 3, "audio_token_index": 4,
                                 "text_config": {"vocab_size": 6, "eos_token_id": 1, "pad_token_id": 3},
                                 "vision_config": {"image_token_id": 3, "depth": 2}},
              "talker_config": {"vocab_size": 40, "tts_codec_start_token_id": 3, "image_token_index": 4},
              "unsized_config": {"bos_token_id": 3}}
    assert _renumbered_token_ids(config, donor, output) == {
        "thinker_config": {"image_token_index": 2, "audio_token_index": 5, "text_config": {"pad_token_id": 2},
                           "vision_config": {"image_token_id": 2}},
        "talker_config": {"tts_codec_start_token_id": 2, "image_token_index": 5},  # 40 rows hold ids 0..4
        "unsized_config": {"bos_token_id": 2}}
    # a talker with a codec vocabulary of 4 ids: its ids below 4 may be codec ids (kept), its ids at or past 4 can
    # only be the tokenizer's (its image token, renumbered as the thinker's)
    codec = {**config, "talker_config": {**config["talker_config"], "vocab_size": 4}}
    assert _renumbered_token_ids(codec, donor, output) == {
        "thinker_config": {"image_token_index": 2, "audio_token_index": 5, "text_config": {"pad_token_id": 2},
                           "vision_config": {"image_token_id": 2}},
        "talker_config": {"image_token_index": 5},
        "unsized_config": {"bos_token_id": 2}}
    nested = {"talker_config": {"vocab_size": 4, "codec_config": {"eos_token_id": 3, "audio_token_index": [4, 1]}}}
    assert _renumbered_token_ids(nested, donor, output) == {  # inherited by a config inside it that has no size
        "talker_config": {"codec_config": {"audio_token_index": [5, 1]}}}


def test_the_output_files_renumber_the_token_ids_of_config_and_generation_config(tmp_path):
    """config.json's and generation_config.json's token ids follow the output tokenizer (bos/eos included), so
    generation stops at the output's id of the donor's end token; the vocabulary size goes where the config has it."""
    import json

    from lightning_merge.tools.tokenizer_merge import _output_files

    class Tokenizer:  # what _output_files asks of a transformers tokenizer
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 3],
                                                                 "do_sample": False}))
    (tmp_path / "tokenizer.model").write_text("the donor's")
    donor = {"<s>": 0, "</s>": 1, "<image>": 3}
    output = {"</s>": 0, "<s>": 1, "<image>": 2, "x": 3}
    config = {"text_config": {"vocab_size": 4, "eos_token_id": 1}, "image_token_index": 3}
    files = _output_files(Tokenizer(), tmp_path, config, 8, donor, output)
    assert files["config.json"] == {"image_token_index": 2, "text_config": {"eos_token_id": 0, "vocab_size": 8}}
    assert files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": [0, 2]}
    assert files["tokenizer.json"] == b"{}" and files["tokenizer.model"] is None
    assert "generation_config.json" not in _output_files(Tokenizer(), tmp_path, config, 8, donor, donor)
