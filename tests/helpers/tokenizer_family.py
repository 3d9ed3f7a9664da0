"""Tiny float32 Llamas whose tokenizers differ, as fine-tunes of one base often do: a base whose BPE tokenizer has
entries past its embedding rows (mergekit strips them), an expert with the base's tokenizer plus two chat tokens
and a resized embedding, and an expert with its own BPE tokenizer (trained on other text). Every shared token's
row is the base's row plus a small delta, so merges are meaningful."""

from __future__ import annotations

import json
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
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = tensors[name]
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


def _with_tokenizers(base: Path, experts: list[Path], n: int) -> None:
    """Give the family of a base whose embeddings have the ``n`` rows of ``bpe_tokenizer(CORPUS, 200)`` the
    tokenizers of :func:`write_tokenizer_family` (the experts' embeddings resized to theirs)."""
    vocab = bpe_tokenizer(CORPUS, 200).get_vocab()
    assert len(vocab) == n
    reserved = bpe_tokenizer(CORPUS, 200)
    reserved.add_special_tokens({"additional_special_tokens": RESERVED})
    reserved.save_pretrained(base)
    chat = bpe_tokenizer(CORPUS, 200)
    chat.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    chat.save_pretrained(experts[0])
    _resize(experts[0], vocab, chat.get_vocab(), n + 4, seed=1)
    other = bpe_tokenizer(OTHER_CORPUS, 200)
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


def write_qwen2_vl_family(root: Path, vocab: int = 64, flat: bool = False, n_experts: int = 2
                          ) -> tuple[Path, list[Path]]:
    """Tiny float32 Qwen2-VLs: ``root/base`` a ``Qwen2VLForConditionalGeneration`` (2 text decoder layers, 2 vision
    blocks) as transformers saves it (its text decoder's ``model.*`` and ``lm_head``, its vision tower's and
    projector's ``visual.*``; layer counts and vocabulary size in ``text_config``), ``root/expert_{i}`` = base + sparse
    deltas on every tensor (the vision tower's too). ``flat``: the configs laid out as Qwen2-VL's published
    checkpoints have them (written by transformers 4: the text decoder's keys at the top level, no ``text_config``)."""
    import shutil

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 32, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    config = Qwen2VLConfig(text_config=text, vision_config={"depth": 2, "embed_dim": 8, "hidden_size": 16,
                                                            "num_heads": 2},
                           architectures=["Qwen2VLForConditionalGeneration"], tie_word_embeddings=False)
    torch.manual_seed(0)
    base = root / "base"
    Qwen2VLForConditionalGeneration(config).save_pretrained(base)
    g = torch.Generator().manual_seed(3)
    tensors = load_file(base / "model.safetensors")
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


def write_vl_tokenizer_family(root: Path, flat: bool = False) -> tuple[Path, list[Path]]:
    """The family of :func:`write_tokenizer_family` as the Qwen2-VLs of :func:`write_qwen2_vl_family` (``flat``
    there): the same tokenizers, the experts' embeddings and LM heads resized to theirs."""
    n = len(bpe_tokenizer(CORPUS, 200).get_vocab())
    base, experts = write_qwen2_vl_family(root, n, flat)
    _with_tokenizers(base, experts, n)
    return base, experts


def tied_copy(folder: Path, dest: Path) -> Path:
    """A copy of model ``folder`` with tied embeddings, as such checkpoints are saved: no ``lm_head.weight`` (the
    head is the input embedding) and ``tie_word_embeddings: true``; its other files copied."""
    import shutil

    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest
