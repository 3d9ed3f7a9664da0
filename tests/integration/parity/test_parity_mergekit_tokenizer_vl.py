"""Parity with mergekit 0.1.5's tokenizer merging on vision-language models (issue 31): tiny float32 Qwen2-VLs,
Qwen2.5-VLs, Qwen3-VLs, Mistral 3s, Gemma 3s, Llama 4s and LLaVAs as transformers 5 saves them
(tests/helpers/tokenizer_family.py: ``write_vl_family``) whose tokenizers differ as in
test_parity_mergekit_tokenizer.py's Llamas, each with its architecture's image tokens. The text decoder's embeddings
and LM head are aligned to the output tokenizer; the vision tower and projector merge as they are. Every tensor
equals mergekit's (token-indexed rows compared token by token), and the output loads with its transformers class and
runs on an image and text, its rows of the tokens one model alone had that model's rows.

mergekit as installed, per architecture:

- Qwen2-VL: its definition reads the text decoder's layer count and the vocabulary size as ``num_hidden_layers`` and
  ``vocab_size`` on the top-level config (transformers 4 kept them there), and transformers 5's ``Qwen2VLConfig``
  holds them in ``text_config`` only (it moves a published checkpoint's top-level keys there when it reads the
  config), so its planning stops with ``RuntimeError: Config Qwen2VLConfig {...} has no attribute
  num_hidden_layers`` (``mergekit/common.py``, ``get_config_value``). The reference runs mergekit with
  ``get_config_value`` and ``set_config_value`` patched to use ``text_config`` for a plain key the top level lacks
  and ``text_config`` has, and nothing else (``test_parity_mergekit.run_mergekit_many(..., text_config=True)``).
  The configs are laid out both as transformers 5 saves them and as the published checkpoints have them (``flat``).
- Qwen2.5-VL: its definition reads the layer count in ``text_config`` but the vocabulary size at the top level
  (``vocab_size_config_key: vocab_size``). Unpatched, mergekit cannot read any model's rows: with the base's
  tokenizer entries past its rows it stops (``IndexError``), and without them it writes the merged size at the top
  level only, where transformers 5 does not read it, and the output does not load
  (:func:`test_mergekit_reads_no_qwen2_5_vl_vocabulary_size_unpatched`). The reference is patched as Qwen2-VL's,
  with both config layouts (its published checkpoints are flat too).
- Qwen3-VL (dense, ``Qwen3VLForConditionalGeneration``: mergekit's ``qwen3_vl_dense.json``) and Llama 4 (a dense and
  a MoE text layer): their definitions read ``text_config.*``; mergekit runs unpatched. Llama 4's base is tied at
  the top level only (as the others' tied copies are), which transformers 5 does not tie (it reads Llama 4's tie
  in ``text_config`` alone): mergekit reads its embedding as its head (``tied_names``), and so does ours.
- Mistral 3 and Gemma 3: their definitions read ``text_config.*``; mergekit runs unpatched. Gemma 3's vision tower
  is named as its published checkpoints name it (``vision_tower.vision_model.*``, which mergekit's definition
  reads): a fresh transformers 5 model saves it without ``vision_model.``, and mergekit then stops (``RuntimeError:
  Tensor vision_tower.vision_model.embeddings.patch_embedding.bias required but not present``).
- LLaVA: mergekit has no definition of ``LlavaForConditionalGeneration`` and infers one from the transformers 5
  model built from the config, whose tensors it names as that model holds them (``model.language_model.*``,
  ``lm_head.weight``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``). It finds the vision tower's and
  the projector's in the checkpoint (``vision_tower.*``, ``multi_modal_projector.*``) and writes them under those
  names, and none of the text decoder's (``language_model.model.*``, ``language_model.lm_head.weight``): it exits 0
  with a model without a text decoder (:func:`test_mergekit_drops_llavas_text_decoder`).
  The reference is then mergekit's merge of each LLaVA's text decoder saved as the Llama it is
  (``LlamaForCausalLM``, same tokenizer) for the text decoder, and mergekit's LLaVA output for the vision tower and
  projector.

Runs when a mergekit install is found (``MERGEKIT_YAML``)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity_mergekit import MERGEKIT, mergekit_outputs
from tokenizer_family import RECIPES, TIED_RECIPES, tied_copy, write_vl_tokenizer_family

from lightning_merge import Expert
from lightning_merge.cli.commands import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]

#: the recipes over ``models`` (layer slices of a model with several stacks are refused: they take ``modules``)
CASES = ("union_ties", "base_task_arithmetic", "model_linear_no_base", "tokens_and_padding", "slerp_union")

#: per family: its architecture, whether its configs are laid out flat (Qwen2-VL's published checkpoints), whether
#: mergekit needs its config reads patched, and the prefixes of its vision tower and projector
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", False, True, ("visual.blocks.", "visual.merger.")),
    "qwen2_vl_flat": ("qwen2_vl", True, True, ("visual.blocks.", "visual.merger.")),
    "qwen2_5_vl": ("qwen2_5_vl", False, True, ("visual.blocks.", "visual.merger.")),
    "qwen2_5_vl_flat": ("qwen2_5_vl", True, True, ("visual.blocks.", "visual.merger.")),
    "qwen3_vl": ("qwen3_vl", False, False, ("model.visual.blocks.", "model.visual.deepstack_merger_list.")),
    "mistral3": ("mistral3", False, False, ("vision_tower.", "multi_modal_projector.")),
    "gemma3": ("gemma3", False, False, ("vision_tower.vision_model.", "multi_modal_projector.")),
    "llama4": ("llama4", False, False, ("vision_model.model.layers.", "multi_modal_projector.")),
}


def _token_indexed(name):
    return name.endswith(("embed_tokens.weight", "lm_head.weight"))


def _cases(family):
    """Gemma 3's checkpoints are tied (no LM head anywhere): a tied copy of its base is its base."""
    return CASES if family == "gemma3" else CASES + tuple(sorted(TIED_RECIPES))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    arch, flat, _, _ = FAMILIES[request.param]
    base, experts = write_vl_tokenizer_family(tmp_path_factory.mktemp(request.param), flat=flat, arch=arch)
    return request.param, base, experts


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, family):
    """mergekit's output of every recipe, made in one mergekit process (its config reads patched for Qwen2-VL)."""
    name, base, experts = family
    texts = {case: RECIPES[case](base, experts) for case in CASES}
    if name != "gemma3":
        tied = tied_copy(base, tmp_path_factory.mktemp(f"{name}_tied") / "base")
        texts.update({case: make(tied, experts) for case, make in TIED_RECIPES.items()})
    return mergekit_outputs(tmp_path_factory.mktemp(f"mergekit_{name}"), texts, text_config=FAMILIES[name][2])


def _ours(tmp_path, recipe):
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "lm"


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _vocab_size(folder):
    """The vocabulary size transformers reads from a model's config.json (a vision-language model's text_config's)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).get_text_config().vocab_size


def _compare(ours, theirs, rename=lambda name: name, names=None):
    """The largest relative difference between our output's tensors (``names``: those; else all, which must be
    mergekit's) and mergekit's tensor of each (under ``rename(name)``); token-indexed rows token by token, padding
    rows as they are. With token-indexed tensors among them, the tokenizers have the same tokens and the configs
    the same vocabulary size."""
    a, b = Expert(ours), Expert(theirs)
    if names is None:
        names = a.names()
        assert sorted(names) == sorted(b.names())
    if any(_token_indexed(n) for n in names):
        mine, mk = _vocab(ours), _vocab(theirs)
        assert set(mine) == set(mk)
        sizes = [_vocab_size(p) for p in (ours, theirs)]
        assert sizes[0] == sizes[1]
    worst = 0.0
    for name in names:
        x, y = a.tensor(name), b.tensor(rename(name))
        assert x.shape == y.shape, name
        if _token_indexed(name):
            tokens = [t for t in sorted(mine, key=mine.get) if mine[t] < sizes[0]]
            assert all(mk[t] < sizes[0] for t in tokens)
            y = torch.cat([y[torch.tensor([mk[t] for t in tokens])], y[len(tokens):]])
        worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    return worst


def test_mergekit_cannot_read_a_qwen2_vl_config_unpatched(tmp_path, family):
    """Why the Qwen2-VL reference is patched: mergekit 0.1.5 as installed stops on the config's layer count."""
    name, base, experts = family
    if not name.startswith("qwen2_vl"):
        pytest.skip("mergekit reads the others' layer count in text_config itself")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["union_ties"](base, experts))
    run = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "RuntimeError: Config Qwen2VLConfig" in run.stderr and "has no attribute num_hidden_layers" in run.stderr


def test_mergekit_reads_no_qwen2_5_vl_vocabulary_size_unpatched(tmp_path, family):
    """Why the Qwen2.5-VL reference is patched: mergekit 0.1.5 as installed reads its vocabulary size at the top
    level, which transformers 5's Qwen2_5_VLConfig lacks (its layer count, read in text_config, it finds). It then
    takes each tokenizer's length for the model's rows: over the base, whose tokenizer has entries past its rows, it
    stops; over the first expert as the base it exits 0 with the merged rows and the merged size at the config's top
    level only, its text_config.vocab_size (which transformers 5 reads) the donor's, and the output does not load.
    Ours writes text_config.vocab_size (the flat layout's top-level vocab_size), and its tensors are mergekit's."""
    import transformers

    name, base, experts = family
    if not name.startswith("qwen2_5_vl"):
        pytest.skip("Qwen2.5-VL's definition alone reads vocab_size at the top level and the layers in text_config")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["union_ties"](base, experts))
    run = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "Unable to get vocab size for" in run.stderr and "has no attribute vocab_size" in run.stderr
    assert "IndexError: index" in run.stderr

    recipe.write_text(RECIPES["union_ties"](experts[0], experts))  # its tokenizer has no entry past its rows
    mk = tmp_path / "mk"
    run = subprocess.run([MERGEKIT, str(recipe), str(mk)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = load_file(mk / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    config = json.loads((mk / "config.json").read_text())
    assert rows == len(_vocab(mk)) > _vocab_size(experts[0])
    assert config["vocab_size"] == rows and config["text_config"]["vocab_size"] == _vocab_size(experts[0])
    assert _vocab_size(mk) == _vocab_size(experts[0])
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(mk)
    ours = _ours(tmp_path, recipe)
    assert _vocab_size(ours) == rows
    written = json.loads((ours / "config.json").read_text())
    assert (written if name.endswith("_flat") else written["text_config"])["vocab_size"] == rows
    worst = _compare(ours, mk, names=[n for n in Expert(ours).names() if not _token_indexed(n)])
    mine, theirs = _vocab(ours), _vocab(mk)  # the token-indexed rows token by token (mergekit's config is wrong)
    assert set(mine) == set(theirs) and len(mine) == rows
    order = [theirs[t] for t in sorted(mine, key=mine.get)]
    for n in [n for n in Expert(ours).names() if _token_indexed(n)]:
        x, y = Expert(ours).tensor(n), Expert(mk).tensor(n)[order]
        worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    assert worst <= 1e-5, worst
    transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ours)


def test_mergekit_needs_gemma3s_published_vision_tower_names(tmp_path):
    """A Gemma 3 as a fresh transformers 5 model saves it names its vision tower ``vision_tower.*``; mergekit's
    definition reads ``vision_tower.vision_model.*`` (the published checkpoints' names) and stops. Ours merges it,
    under the names it holds."""
    base, experts = write_vl_tokenizer_family(tmp_path / "models", arch="gemma3")
    for folder in [base, *experts]:
        tensors = load_file(folder / "model.safetensors")
        save_file({n.replace("vision_tower.vision_model.", "vision_tower."): v for n, v in tensors.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["union_ties"](base, experts))
    run = subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "RuntimeError: Tensor vision_tower.vision_model.embeddings.patch_embedding.bias required but not " \
           "present in model" in run.stderr
    ours = _ours(tmp_path, recipe)
    assert sorted(Expert(ours).names()) == sorted(Expert(base).names())


@pytest.mark.parametrize("case", CASES + tuple(sorted(TIED_RECIPES)))
def test_vl_tokenizer_merging_gives_mergekits_model(tmp_path, family, theirs, case):
    name, _, _ = family
    if case not in _cases(name):
        pytest.skip("Gemma 3's base is tied already")
    vision, projector = FAMILIES[name][3]
    recipe, mk = theirs[case]
    ours = _ours(tmp_path, recipe)
    names = Expert(ours).names()
    assert any(n.startswith(vision) for n in names) and any(n.startswith(projector) for n in names)
    worst = _compare(ours, mk)
    print(f"{name} {case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{name} {case}: largest relative difference {worst}"


# -- LLaVA: mergekit has no definition; the text decoder's reference is the Llama it is ------------------------------


def _as_llama(folder, dest):
    """A LLaVA's text decoder saved as the ``LlamaForCausalLM`` it is: its ``language_model.model.*`` as ``model.*``,
    ``language_model.lm_head.weight`` as ``lm_head.weight``, its ``text_config`` as the config (tied when the LLaVA's
    config ties at either level), its tokenizer."""
    dest.mkdir(parents=True)
    tensors = load_file(folder / "model.safetensors")
    save_file({n[len("language_model."):]: v for n, v in tensors.items() if n.startswith("language_model.")},
              dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    text = dict(config["text_config"], architectures=["LlamaForCausalLM"])
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    (dest / "config.json").write_text(json.dumps(text, indent=2))
    for item in folder.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(item, dest / item.name)
    return dest


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base, experts = write_vl_tokenizer_family(root / "llava", arch="llava")
    tied = tied_copy(base, root / "llava_tied" / "base")
    llamas = {p: _as_llama(p, root / "llama" / p.parent.name / p.name) for p in [base, *experts, tied]}
    return base, experts, tied, llamas


@pytest.fixture(scope="module")
def llava_theirs(tmp_path_factory, llava):
    """mergekit's output of every recipe over the LLaVAs (``llava/<case>``) and over their Llamas
    (``llama/<case>``), in one mergekit process."""
    base, experts, tied, llamas = llava
    texts = {}
    for case in CASES + tuple(sorted(TIED_RECIPES)):
        make = RECIPES.get(case) or TIED_RECIPES[case]
        b = tied if case in TIED_RECIPES else base
        texts[f"llava_{case}"] = make(b, experts)
        texts[f"llama_{case}"] = make(llamas[b], [llamas[e] for e in experts])
    return mergekit_outputs(tmp_path_factory.mktemp("mergekit_llava"), texts)


def test_mergekit_drops_llavas_text_decoder(llava, llava_theirs):
    """mergekit 0.1.5 on a LLaVA as transformers 5 saves it: no definition, an inferred one under the model's own
    names, and an output with the vision tower and projector (under ``model.*``) and no text decoder."""
    base, _, _, _ = llava
    _, mk = llava_theirs["llava_union_ties"]
    written = set(Expert(mk).names())
    held = set(Expert(base).names())
    assert not any(n.startswith(("language_model.", "model.language_model.", "lm_head.")) for n in written)
    assert written == {"model." + n for n in held if n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert len(written) == 43 and len(held) == 64


@pytest.mark.parametrize("case", CASES + tuple(sorted(TIED_RECIPES)))
def test_llava_tokenizer_merging_gives_mergekits_llama_and_vision_tower(tmp_path, llava_theirs, case):
    """Our LLaVA merge: its text decoder equals mergekit's merge of the Llamas, its vision tower and projector
    mergekit's LLaVA merge (token-indexed rows token by token)."""
    recipe, mk_llava = llava_theirs[f"llava_{case}"]
    _, mk_llama = llava_theirs[f"llama_{case}"]
    ours = _ours(tmp_path, recipe)
    names = Expert(ours).names()
    text = [n for n in names if n.startswith("language_model.")]
    other = [n for n in names if n not in text]
    assert len(text) == 21 and len(other) == 43
    assert sorted(n[len("language_model."):] for n in text) == sorted(Expert(mk_llama).names())
    worst = max(_compare(ours, mk_llama, lambda n: n[len("language_model."):], text),
                _compare(ours, mk_llava, lambda n: "model." + n, other))
    print(f"llava {case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"llava {case}: largest relative difference {worst}"
