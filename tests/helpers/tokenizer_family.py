"""Tiny float32 Llamas whose tokenizers differ, as fine-tunes of one base often do: a base whose BPE tokenizer has
entries past its embedding rows (mergekit strips them), an expert with the base's tokenizer plus two chat tokens
and a resized embedding, and an expert with its own BPE tokenizer (trained on other text). Every shared token's
row is the base's row plus a small delta, so merges are meaningful."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_merge.tools.testing import llama_config, write_llama_family

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a merge of models keeps what each model learned",
    "tokens rows embeddings heads layers weights",
    "lightning trains models and merges them at the end",
]
OTHER_CORPUS = [
    "curvature weighs each parameter by how much the loss cares",
    "second moments of adam are a cheap fisher",
    "the dog and the cat merge their rows",
]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
RESERVED = ["<reserved_0>", "<reserved_1>"]


def bpe_tokenizer(corpus: list[str], size: int):
    """A byte-level-free BPE tokenizer (whitespace pre-tokenizer) trained on ``corpus``: deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _resize(folder: Path, old_vocab: dict[str, int], new_vocab: dict[str, int], rows: int, seed: int) -> None:
    """Rewrite a model's embedding and LM head for ``new_vocab`` with ``rows`` rows: a token it shares with
    ``old_vocab`` keeps its row there (plus a small delta), a new token gets a random row."""
    g = torch.Generator().manual_seed(seed)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(("embed_tokens.weight", "lm_head.weight"))]:  # under a prefix
        old = tensors[name]  # in a vision-language model's checkpoint (``language_model.model.embed_tokens``)
        new = 0.02 * torch.randn((rows, old.shape[1]), generator=g, dtype=old.dtype)
        for token, i in new_vocab.items():
            j = old_vocab.get(token)
            if j is not None and j < old.shape[0] and i < rows:
                new[i] = old[j] + 0.005 * torch.randn(old.shape[1], generator=g, dtype=old.dtype)
        tensors[name] = new
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    holder = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
    holder["vocab_size"] = rows  # a vision-language model's is its text config's
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _tokenizer(corpus: list[str], special: Sequence[str] = ()):
    tokenizer = bpe_tokenizer(corpus, 200)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def _with_tokenizers(base: Path, experts: list[Path], n: int, image: Sequence[str] = ()) -> None:
    """Give the family of a base whose embeddings have the ``n`` rows of ``bpe_tokenizer(CORPUS, 200)`` plus
    ``image`` (special tokens, each tokenizer's first added ones: a vision-language model's image tokens) the
    tokenizers of :func:`write_tokenizer_family` (the experts' embeddings resized to theirs)."""
    vocab = _tokenizer(CORPUS, image).get_vocab()
    assert len(vocab) == n
    _tokenizer(CORPUS, [*image, *RESERVED]).save_pretrained(base)
    chat = _tokenizer(CORPUS, [*image, *CHAT_TOKENS])
    chat.save_pretrained(experts[0])
    _resize(experts[0], vocab, chat.get_vocab(), n + 4, seed=1)
    other = _tokenizer(OTHER_CORPUS, image)
    other.save_pretrained(experts[1])
    _resize(experts[1], vocab, other.get_vocab(), len(other.get_vocab()) + 2, seed=2)


def write_tokenizer_family(root: Path) -> tuple[Path, list[Path]]:
    """``root/base`` (a BPE tokenizer of n entries and two reserved tokens past its n embedding rows, which mergekit
    strips), ``root/expert_0`` (the BPE tokenizer plus :data:`CHAT_TOKENS`, n + 4 rows) and ``root/expert_1`` (its own
    BPE tokenizer of m entries, m + 2 rows)."""
    base_tok = bpe_tokenizer(CORPUS, 200)
    n = len(base_tok.get_vocab())
    base, experts = write_llama_family(root, llama_config(vocab=n), n_experts=2, delta_density=0.3,
                                       dtype=torch.float32)
    _with_tokenizers(base, experts, n)
    return base, experts


#: the vision-language architectures of :func:`write_vl_family`: its transformers class, and its image tokens as its
#: processor names them, each with the config key of its id (None: a plain token the text decoder embeds)
_QWEN_IMAGE = {"<|vision_start|>": "vision_start_token_id", "<|image_pad|>": "image_token_id",
               "<|vision_end|>": "vision_end_token_id"}
VL_ARCHS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", _QWEN_IMAGE),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", _QWEN_IMAGE),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", _QWEN_IMAGE),
    "llava": ("LlavaForConditionalGeneration", {"<image>": "image_token_id"}),
    "mistral3": ("Mistral3ForConditionalGeneration", {"[IMG]": "image_token_id", "[IMG_BREAK]": None,
                                                      "[IMG_END]": None}),
    "gemma3": ("Gemma3ForConditionalGeneration", {"<start_of_image>": "boi_token_id",
                                                  "<image_soft_token>": "image_token_id",
                                                  "<end_of_image>": "eoi_token_id"}),
    # the model finds an image's features at <|patch|> (its config's image_token_index); <|image|> precedes them
    "llama4": ("Llama4ForConditionalGeneration", {"<|image_start|>": "boi_token_index", "<|image|>": None,
                                                  "<|patch|>": "image_token_index",
                                                  "<|image_end|>": "eoi_token_index"}),
}


def _vl_config(arch: str, vocab: int, image_ids: dict[str, int]):
    """A tiny float32 config of ``arch`` (2 text decoder layers, 2 vision layers (Qwen3-VL's 3), 28-pixel images),
    its image tokens' ids ``image_ids`` (config key -> id)."""
    import transformers

    text = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 32, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 28}
    name = VL_ARCHS[arch][0]
    if arch == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config={"depth": 2, "embed_dim": 8, "hidden_size": 16, "num_heads": 2}, architectures=[name],
            tie_word_embeddings=False, **image_ids)
    if arch == "qwen2_5_vl":  # window attention in its first vision block, full attention in its second
        return transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": 16, "fullatt_block_indexes": [1]},
            architectures=[name], tie_word_embeddings=False, **image_ids)
    if arch == "qwen3_vl":  # 3 vision blocks, each feeding a deepstack merger (mergekit's definition reads 3)
        return transformers.Qwen3VLConfig(
            text_config={**text, "head_dim": 8, "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                                                 "mrope_interleaved": True}},
            vision_config={"depth": 3, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": 16, "patch_size": 14, "num_position_embeddings": 16,
                           "deepstack_visual_indexes": [0, 1, 2]},
            architectures=[name], tie_word_embeddings=False, **image_ids)
    if arch == "llama4":  # a dense layer then a MoE layer (2 experts, a shared one); 4 patches of 14 pixels
        return transformers.Llama4Config(  # pixel-shuffled 2 x 2 (4 x 16 channels, its adapter's input): 1 token
            text_config={**text, "head_dim": 8, "intermediate_size_mlp": 32, "num_local_experts": 2,
                         "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "attention_chunk_size": 8},
            vision_config={**vision, "intermediate_size": 64, "patch_size": 14, "vision_output_dim": 16,
                           "projector_input_dim": 16, "projector_output_dim": 16},
            architectures=[name], tie_word_embeddings=False, **image_ids)
    if arch == "llava":  # a Llama text decoder, a CLIP vision tower (4 patches of 14 pixels: 4 image tokens)
        return transformers.LlavaConfig(
            text_config={"model_type": "llama", **text},
            vision_config={"model_type": "clip_vision_model", **vision, "patch_size": 14, "projection_dim": 16},
            image_seq_length=4, architectures=[name], tie_word_embeddings=False, **image_ids)
    if arch == "mistral3":  # a Mistral text decoder, a Pixtral vision tower (16 patches of 7 pixels, merged 2 x 2)
        return transformers.Mistral3Config(
            text_config={"model_type": "mistral", **text, "head_dim": 8},
            vision_config={"model_type": "pixtral", **vision, "patch_size": 7, "head_dim": 8},
            spatial_merge_size=2, architectures=[name], tie_word_embeddings=False, **image_ids)
    if arch == "gemma3":  # tied embeddings, as Gemma 3's checkpoints have; a SigLIP vision tower, 4 tokens an image
        return transformers.Gemma3Config(
            text_config={"model_type": "gemma3_text", **text, "head_dim": 8, "sliding_window": 8},
            vision_config={"model_type": "siglip_vision_model", **vision, "patch_size": 7, "vision_use_head": False},
            mm_tokens_per_image=4, architectures=[name], **image_ids)
    raise ValueError(arch)


def _gemma3_vision(name: str) -> str:
    """A Gemma 3 tensor's name as its published checkpoints have it (a fresh model saves the vision tower's
    without ``vision_model.``)."""
    return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") and \
        not name.startswith("vision_tower.vision_model.") else name


def write_vl_family(root: Path, arch: str = "qwen2_vl", vocab: int = 64, flat: bool = False, n_experts: int = 2,
                    image_ids: dict[str, int] | None = None) -> tuple[Path, list[Path]]:
    """Tiny float32 vision-language models of ``arch`` (:data:`VL_ARCHS`): ``root/base`` as transformers saves it
    (the checkpoint's names: Qwen2-VL's and Qwen2.5-VL's text decoder ``model.*`` and ``lm_head``, their vision
    tower's and projector's ``visual.*``; Qwen3-VL's ``model.language_model.*``, ``lm_head``, ``model.visual.*``;
    Llama 4's ``language_model.model.*``, ``language_model.lm_head``, ``vision_model.*``, ``multi_modal_projector.*``;
    the others' ``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``,
    ``multi_modal_projector.*``, Gemma 3's ``vision_tower.vision_model.*`` as its published
    checkpoints have it; layer counts and vocabulary size in ``text_config``), ``root/expert_{i}`` = base +
    sparse deltas on every tensor (the vision tower's too). ``flat`` (Qwen2-VL and Qwen2.5-VL): the configs laid out
    as their published checkpoints have them (written by transformers 4: the text decoder's keys at the top level,
    no ``text_config``). ``image_ids``: the config's image token ids (key -> id)."""
    import shutil

    import transformers

    config = _vl_config(arch, vocab, image_ids or {})
    torch.manual_seed(0)
    base = root / "base"
    getattr(transformers, VL_ARCHS[arch][0])(config).save_pretrained(base)
    g = torch.Generator().manual_seed(3)
    tensors = load_file(base / "model.safetensors")
    if arch == "gemma3":  # Gemma 3's checkpoints (and transformers 5 saving one it loaded) name the vision tower
        tensors = {_gemma3_vision(n): v for n, v in tensors.items()}  # vision_tower.vision_model.*
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    experts = [root / f"expert_{i}" for i in range(n_experts)]
    for folder in experts:
        shutil.copytree(base, folder)
        save_file({name: value + 0.01 * torch.randn(value.shape, generator=g) * (torch.rand(value.shape, generator=g)
                                                                                  < 0.3)
                   for name, value in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    for folder in [base, *experts] if flat else []:
        config = json.loads((folder / "config.json").read_text())
        text = {k: v for k, v in config.pop("text_config").items() if k not in ("model_type", "layer_types", "dtype")}
        (folder / "config.json").write_text(json.dumps({**text, **config}, indent=2))
    return base, experts


def write_qwen2_vl_family(root: Path, vocab: int = 64, flat: bool = False, n_experts: int = 2
                          ) -> tuple[Path, list[Path]]:
    """Tiny float32 Qwen2-VLs (``Qwen2VLForConditionalGeneration``): :func:`write_vl_family`."""
    return write_vl_family(root, "qwen2_vl", vocab, flat, n_experts)


def write_vl_tokenizer_family(root: Path, flat: bool = False, arch: str = "qwen2_vl") -> tuple[Path, list[Path]]:
    """The family of :func:`write_tokenizer_family` as the vision-language models of :func:`write_vl_family`
    (``arch``, ``flat`` there): the same tokenizers, each with the architecture's image tokens first among its added
    tokens (in every model's rows; the config's ids are the base's), the experts' embeddings and LM heads resized to
    theirs."""
    image = list(VL_ARCHS[arch][1])
    first = len(bpe_tokenizer(CORPUS, 200).get_vocab())
    ids = {key: first + i for i, key in enumerate(VL_ARCHS[arch][1].values()) if key is not None}
    n = first + len(image)
    base, experts = write_vl_family(root, arch, n, flat, image_ids=ids)
    _with_tokenizers(base, experts, n, image)
    return base, experts


def tied_copy(folder: Path, dest: Path, text_config: bool = False) -> Path:
    """A copy of model ``folder`` with tied embeddings, as such checkpoints are saved: no ``lm_head.weight`` (the
    head is the input embedding) and ``tie_word_embeddings: true`` (``text_config``: in its ``text_config`` too,
    where Llama 4's text decoder alone reads it); its other files copied."""
    import shutil

    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    for name in [n for n in tensors if n.endswith("lm_head.weight")]:  # a vision-language model's under a prefix
        del tensors[name]
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = True
    if text_config:
        config["text_config"]["tie_word_embeddings"] = True
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


#: mergekit recipes with tokenizer keys, as ``(base, experts) -> YAML``, shared by the tokenizer parity tests
#: (Llama and vision-language) and the vision-language end-to-end tests
RECIPES = {
    "union_ties": lambda b, e: f"""
merge_method: ties
base_model: {b}
dtype: float32
tokenizer_source: union
parameters: {{density: 0.5}}
models:
  - {{model: {e[0]}, parameters: {{weight: 0.7}}}}
  - {{model: {e[1]}, parameters: {{weight: 0.5}}}}
""",
    "base_task_arithmetic": lambda b, e: f"""
merge_method: task_arithmetic
base_model: {b}
dtype: float32
tokenizer_source: base
models:
  - {{model: {e[0]}, parameters: {{weight: 0.6}}}}
  - {{model: {e[1]}, parameters: {{weight: 0.4}}}}
""",
    "model_linear_no_base": lambda b, e: f"""
merge_method: linear
dtype: float32
tokenizer_source: {e[1]}
models:
  - {{model: {e[0]}, parameters: {{weight: 0.3}}}}
  - {{model: {e[1]}, parameters: {{weight: 0.7}}}}
""",
    "tokens_and_padding": lambda b, e: f"""
merge_method: task_arithmetic
base_model: {b}
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "{CHAT_TOKENS[0]}": {{source: {e[0]}}}
    "{CHAT_TOKENS[1]}": {{source: {{kind: zero}}}}
    "<think>": {{source: {{kind: model_token, model: {b}, token: "</s>"}}}}
    "cat": {{source: {{kind: model_token, model: {e[1]}, token_id: 5}}, force: true}}
models:
  - {{model: {e[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {e[1]}, parameters: {{weight: 0.5}}}}
""",
    "slerp_union": lambda b, e: f"""
merge_method: slerp
base_model: {b}
dtype: float32
tokenizer_source: union
parameters: {{t: 0.3}}
models:
  - model: {b}
  - model: {e[1]}
""",
    # layer stacking across models whose vocabularies differ: embeddings aligned among the first slice's sources,
    # the LM head among the last's
    "slices_passthrough_union": lambda b, e: f"""
merge_method: passthrough
base_model: {b}
dtype: float32
tokenizer_source: union
slices:
  - sources: [{{model: {e[0]}, layer_range: [0, 2]}}]
  - sources: [{{model: {e[1]}, layer_range: [1, 2]}}]
""",
    "slices_ties_union": lambda b, e: f"""
merge_method: ties
base_model: {b}
dtype: float32
tokenizer_source: union
parameters: {{density: 0.5}}
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {e[0]}, layer_range: [0, 2], parameters: {{weight: 0.8}}}}
      - {{model: {e[1]}, layer_range: [0, 2], parameters: {{weight: 0.4}}}}
""",
}


#: a base with tied embeddings (no ``lm_head.weight``; its head is its embedding) merged with experts that trained
#: their own head: every model is read with its tied names (mergekit's ``tied_names``), so the base's head is its
#: embedding; the output holds a head of its own, and our config unties it (mergekit keeps the base's
#: ``tie_word_embeddings: true``, which makes transformers replace that head by the embedding on load)
#: the same recipes over a tied copy of the base (``tied_copy``)
TIED_RECIPES = {
    "tied_base_union_ties": lambda t, e: RECIPES["union_ties"](t, e),
    "tied_base_task_arithmetic": lambda t, e: RECIPES["base_task_arithmetic"](t, e),
}
