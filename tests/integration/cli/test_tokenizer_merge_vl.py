"""Tokenizer merging on vision-language models, end to end, without mergekit (issue 31): tiny float32 Qwen2-VLs,
Qwen2.5-VLs, Qwen3-VLs, LLaVAs, Mistral 3s, Gemma 3s and Llama 4s whose tokenizers differ
(tests/helpers/tokenizer_family.py: ``write_vl_tokenizer_family``) are merged through a recipe, and the output is
loaded with its transformers class and run on an image (random ``pixel_values`` of its vision tower's shape, its
image tokens in ``input_ids`` as its processor places them) and text with tokens only one model knew: the logits are
finite, over the merged vocabulary, and depend on the image. Its embedding and LM-head rows of each token that one
model alone has are that model's rows (the alignment rule of
docs/cli.md#tokenizer-merging-tokenizer_source-tokenizer: every model takes that row, so TIES leaves it as it is and
a linear merge averages it with itself). Parity with mergekit:
tests/integration/parity/test_parity_mergekit_tokenizer_vl.py."""

import json

import pytest
import torch
from tokenizer_family import CHAT_TOKENS, RECIPES, VL_ARCHS, tied_copy, write_vl_tokenizer_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main

pytestmark = pytest.mark.slow  # builds tiny models with transformers, trains BPE tokenizers, runs the models

#: TIES over the base with the union of the tokenizers, the same over a tied copy of the base, and a linear merge
#: without a base whose tokenizer is the second expert's (which numbers its tokens its own way)
CASES = ("union_ties", "tied_base_union_ties", "model_linear_no_base")


@pytest.fixture(scope="module", params=sorted(VL_ARCHS))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base, experts = write_vl_tokenizer_family(root / "models", arch=request.param)
    # Gemma 3's is tied already; Llama 4's text decoder takes its tie from text_config alone (as such a model saves it)
    tied = tied_copy(base, root / "tied" / "base", text_config=request.param == "llama4") \
        if request.param != "gemma3" else base
    return request.param, base, experts, tied


def _image(arch, vocab, g):
    """An image's model inputs and its tokens as ``arch``'s processor places them (28 x 28 pixels)."""
    t = {token: vocab[token] for token in VL_ARCHS[arch][1]}
    if arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # 2 x 2 patches of 14 pixels (two frames), merged 2 x 2:
        # one image token (Qwen3-VL's patch size set to 14 here)
        return ({"pixel_values": torch.randn(4, 3 * 2 * 14 * 14, generator=g),
                 "image_grid_thw": torch.tensor([[1, 2, 2]])},
                [t["<|vision_start|>"], t["<|image_pad|>"], t["<|vision_end|>"]])
    pixels = {"pixel_values": torch.randn(1, 3, 28, 28, generator=g)}
    if arch == "llava":  # 2 x 2 patches of 14 pixels, the class token left out: image_seq_length 4
        return pixels, [t["<image>"]] * 4
    if arch == "llama4":  # 2 x 2 patches of 14 pixels, pixel-shuffled 2 x 2: one <|patch|> after <|image|>
        return pixels, [t["<|image_start|>"], t["<|image|>"], t["<|patch|>"], t["<|image_end|>"]]
    if arch == "mistral3":  # 4 x 4 patches of 7 pixels merged 2 x 2: rows of [IMG], each row then [IMG_BREAK]
        return {**pixels, "image_sizes": torch.tensor([[28, 28]])}, \
            [t["[IMG]"]] * 2 + [t["[IMG_BREAK]"]] + [t["[IMG]"]] * 2 + [t["[IMG_END]"]]  # the last [IMG_END]
    return pixels, [t["<start_of_image>"]] + [t["<image_soft_token>"]] * 4 + [t["<end_of_image>"]]  # gemma3


def _only_one_has(folders):
    """``{token: (folder, its id there)}`` for each token that one model alone has among its embedding rows."""
    from transformers import AutoConfig, AutoTokenizer

    owners = {}
    for folder in dict.fromkeys(folders):
        rows = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
        for token, i in AutoTokenizer.from_pretrained(folder).get_vocab().items():
            if i < rows:
                owners.setdefault(token, []).append((folder, i))
    return {token: held[0] for token, held in owners.items() if len(held) == 1}


@pytest.mark.parametrize("case", CASES)
def test_the_merged_vl_model_runs_on_an_image_with_each_tokens_rows(tmp_path, family, case):
    import transformers

    arch, base, experts, tied = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[case.replace("tied_base_", "")](tied if case.startswith("tied") else base, experts))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    model = getattr(transformers, VL_ARCHS[arch][0]).from_pretrained(out, dtype=torch.float32).eval()
    size = model.config.get_text_config().vocab_size
    assert size == len(vocab)

    # the image token ids the config names are the merged tokenizer's ids of those tokens
    config = json.loads((out / "config.json").read_text())
    for token, key in VL_ARCHS[arch][1].items():
        if key is not None:
            assert getattr(model.config, key) == vocab[token], (key, token)

    # every token one model alone had: its rows are that model's (embedding; LM head, a tied model's its embedding)
    models = [] if case == "model_linear_no_base" else [tied if case.startswith("tied") else base]
    only = _only_one_has(models + list(experts))
    assert set(CHAT_TOKENS) <= set(only) and "curvature" in only  # tokens of the first, of the second expert
    embed, head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    for token, (folder, i) in [(t, held) for t, held in only.items() if t in vocab]:
        donor = Expert(folder)
        names = sorted(donor.names())
        rows = donor.tensor(next(n for n in names if n.endswith("embed_tokens.weight")))
        heads = next((donor.tensor(n) for n in names if n.endswith("lm_head.weight")), rows)
        if case == "model_linear_no_base":  # 0.3 x + 0.7 x
            torch.testing.assert_close(embed[vocab[token]], rows[i], rtol=1e-6, atol=0)
            torch.testing.assert_close(head[vocab[token]], heads[i], rtol=1e-6, atol=0)
        else:
            assert torch.equal(embed[vocab[token]], rows[i]), token
            assert torch.equal(head[vocab[token]], heads[i]), token
    assert config.get("tie_word_embeddings") is (arch == "gemma3")  # a tied base's merge holds a head of its own

    # an image and text with tokens only one model knew
    g = torch.Generator().manual_seed(0)
    text = tokenizer(f"{CHAT_TOKENS[0]} curvature weighs the cat", add_special_tokens=False).input_ids
    inputs, image = _image(arch, vocab, g)
    ids = torch.tensor([image + text])
    extra = {"mm_token_type_ids": (ids == vocab["<|image_pad|>"]).long()} if arch.startswith("qwen") else {}
    if arch == "llava":  # its processor runs here (Pixtral's and Qwen2-VL's need torchvision, not installed)
        processor = transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                                            crop_size={"height": 28, "width": 28}),
            tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
            num_additional_image_tokens=1)
        pixels = torch.randint(0, 256, (28, 28, 3), generator=g, dtype=torch.uint8).numpy()
        processed = processor(text=f"<image>{tokenizer.decode(text)}", images=[pixels], return_tensors="pt")
        assert processed.input_ids.tolist() == ids.tolist()
        assert processed.pixel_values.shape == inputs["pixel_values"].shape
        inputs["pixel_values"] = processed.pixel_values
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs, **extra).logits
        other = model(input_ids=ids, **{**inputs, "pixel_values": torch.randn(inputs["pixel_values"].shape,
                                                                              generator=g)}, **extra).logits
    assert logits.shape == (1, ids.shape[1], size) and torch.isfinite(logits).all()
    after = len(image)  # the text's first token (Gemma 3's sliding window, 8 here, may not reach back further)
    assert (logits[0, after] - other[0, after]).abs().max() > 1e-4  # the text's logits depend on the image
