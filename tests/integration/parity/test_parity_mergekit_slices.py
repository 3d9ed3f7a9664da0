"""Parity with mergekit 0.1.5 for its recipe features beyond the merge methods (issue 31): ``slices`` /
``layer_range`` (passthrough layer stacking, and slices merged with other methods), ``chat_template``, and what the
output folder holds (config.json's layer count, the recipe, a model card). Runs when a mergekit install is found
(``MERGEKIT_YAML``)."""

import itertools
import json

import jinja2
import pytest
import torch
from test_parity_mergekit import MERGEKIT, mergekit_outputs, relative_error
from tokenizer_family import tied_copy

from lightning_merge import Expert
from lightning_merge.cli.commands import main
from lightning_merge.tools.testing import llama_config, render_chat, write_llama_family

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Four float32 layers, a base and two experts; the base carries a (word-level) tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    base, experts = write_llama_family(tmp_path_factory.mktemp("slices"), llama_config(layers=4), n_experts=2,
                                       delta_density=0.3, dtype=torch.float32)
    vocab = {f"w{i}": i for i in range(250)} | {"<unk>": 250, "<s>": 251, "</s>": 252}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(base)
    return base, experts


SLICES = {
    # a frankenmerge: layers 0-2 of one expert, then 1-3 of the other (six output layers), o_proj scaled down
    "passthrough_stack": lambda b, e: f"""
merge_method: passthrough
base_model: {b}
dtype: float32
slices:
  - sources: [{{model: {e[0]}, layer_range: [0, 3]}}]
  - sources: [{{model: {e[1]}, layer_range: [1, 4]}}]
    parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}
""",
    # one model's layers repeated (a self-stack), no base_model: config and embeddings from the first source
    "passthrough_self_stack": lambda b, e: f"""
merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {e[0]}, layer_range: [0, 2]}}]
  - sources: [{{model: {e[0]}, layer_range: [1, 3]}}]
  - sources: [{{model: {e[0]}, layer_range: [2, 4]}}]
""",
    # ties per slice: the base is a source of each slice, other ranges shifted, gradients over each slice, a
    # slice's parameters over the recipe's, a source's over the slice's
    "ties_slices": lambda b, e: f"""
merge_method: ties
base_model: {b}
dtype: float32
parameters: {{density: 0.5}}
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {e[0]}, layer_range: [0, 2], parameters: {{weight: [0.2, 1.0]}}}}
      - {{model: {e[1]}, layer_range: [1, 3], parameters: {{weight: 0.7}}}}
  - sources:
      - {{model: {b}, layer_range: [1, 4]}}
      - {{model: {e[1]}, layer_range: [1, 4], parameters: {{weight: 0.5}}}}
      - {{model: {e[0]}, layer_range: [0, 3], parameters: {{weight: 1.0, density: [0.3, 0.9]}}}}
    parameters: {{density: 0.8}}
""",
    # the classic slerp recipe: t per module as gradients over the slice
    "slerp_slices": lambda b, e: f"""
merge_method: slerp
base_model: {e[0]}
dtype: float32
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.5}}
slices:
  - sources:
      - {{model: {e[0]}, layer_range: [0, 4]}}
      - {{model: {e[1]}, layer_range: [0, 4]}}
""",
    # linear over two slices of different models, no base
    "linear_slices": lambda b, e: f"""
merge_method: linear
dtype: float32
slices:
  - sources:
      - {{model: {e[0]}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {e[1]}, layer_range: [2, 4], parameters: {{weight: [1.0, 0.2]}}}}
  - sources:
      - {{model: {e[1]}, layer_range: [0, 1], parameters: {{weight: 0.6}}}}
      - {{model: {b}, layer_range: [3, 4], parameters: {{weight: 0.4}}}}
""",
}


#: models with tied embeddings (no ``lm_head.weight``: the head is the embedding) among models that trained their
#: own head: each is read with its tied names (mergekit's ``tied_names``); ``t`` is a tied copy of the base
TIED = {
    "tied_base_ties": lambda t, b, e: f"""
merge_method: ties
base_model: {t}
dtype: float32
parameters: {{density: 0.5}}
models:
  - {{model: {e[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {e[1]}, parameters: {{weight: 0.6}}}}
""",
    "tied_first_linear_no_base": lambda t, b, e: f"""
merge_method: linear
dtype: float32
models:
  - {{model: {t}, parameters: {{weight: 0.3}}}}
  - {{model: {e[0]}, parameters: {{weight: 0.7}}}}
""",
    # the embedding from the first slice's tied model, the head from the last slice's untied one
    "tied_passthrough_stack": lambda t, b, e: f"""
merge_method: passthrough
base_model: {t}
dtype: float32
slices:
  - sources: [{{model: {t}, layer_range: [0, 2]}}]
  - sources: [{{model: {e[1]}, layer_range: [1, 4]}}]
""",
}


TEMPLATES = ["chatml", "llama3", "alpaca", "mistral", "exaone", "jinja"]


def _template_recipe(template, base, experts) -> str:
    value = "\"{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}\"" \
        if template == "jinja" else template
    return (f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nchat_template: {value}\nmodels:\n"
            f"  - {{model: {experts[0]}, parameters: {{weight: 0.5}}}}\n")


@pytest.fixture(scope="module")
def mk_outputs(tmp_path_factory, family):
    """mergekit's output of every slices, chat-template and tied-embedding recipe, made in one mergekit process."""
    base, experts = family
    tied = tied_copy(base, tmp_path_factory.mktemp("tied") / "base")
    texts = {case: make(base, experts) for case, make in SLICES.items()}
    texts.update({case: make(tied, base, experts) for case, make in TIED.items()})
    texts.update({f"chat_{t}": _template_recipe(t, base, experts) for t in TEMPLATES})
    return mergekit_outputs(tmp_path_factory.mktemp("mk_slices"), texts)


def _run_both(tmp_path, mk_outputs, case):
    recipe, theirs = mk_outputs[case]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "lm", theirs


@pytest.mark.parametrize("case", sorted(SLICES))
def test_slices_give_mergekits_model(tmp_path, mk_outputs, case):
    ours, theirs = _run_both(tmp_path, mk_outputs, case)
    worst = relative_error(Expert(ours), Expert(theirs))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"
    mine, mk = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert mine["num_hidden_layers"] == mk["num_hidden_layers"]
    # mergekit writes the config through transformers (which adds its defaults): every key of ours is the same there
    assert {k: v for k, v in mine.items() if k not in ("torch_dtype", "dtype")} == \
        {k: mk.get(k) for k in mine if k not in ("torch_dtype", "dtype")}
    assert (ours / "mergekit_config.yml").read_text() == mk_outputs[case][0].read_text()


@pytest.mark.parametrize("case", sorted(TIED))
def test_tied_embeddings_merge_as_mergekit_and_the_output_keeps_its_head(tmp_path, mk_outputs, case):
    """A model with tied embeddings merged with models that have their own LM head: mergekit's tensors (its head
    read as its embedding), and a config that unties them, so transformers loads the merged head. mergekit keeps the
    donor's ``tie_word_embeddings: true`` (its head is then replaced by the embedding on load): the one difference."""
    from transformers import LlamaForCausalLM

    ours, theirs = _run_both(tmp_path, mk_outputs, case)
    worst = relative_error(Expert(ours), Expert(theirs))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"
    assert "lm_head.weight" in Expert(ours).names()
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is False
    if "no_base" not in case:  # (without a base mergekit's config came from an untied model here)
        assert json.loads((theirs / "config.json").read_text())["tie_word_embeddings"] is True
    model = LlamaForCausalLM.from_pretrained(ours, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight.detach(), Expert(ours).tensor("lm_head.weight"))


def test_a_stacked_model_loads_in_transformers_as_its_layers(tmp_path, family, mk_outputs):
    """The frankenmerge is a working LlamaForCausalLM of six layers, layer j being the source layer planned."""
    from transformers import LlamaForCausalLM

    base, experts = family
    ours, _ = _run_both(tmp_path, mk_outputs, "passthrough_stack")
    model = LlamaForCausalLM.from_pretrained(ours, dtype=torch.float32)
    assert len(model.model.layers) == 6
    source = Expert(experts[1])
    torch.testing.assert_close(model.model.layers[4].mlp.up_proj.weight.data,
                               source.tensor("model.layers.2.mlp.up_proj.weight"), rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[3].self_attn.o_proj.weight.data,
                               0.5 * source.tensor("model.layers.1.self_attn.o_proj.weight"), rtol=0, atol=0)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def _conversations():
    """Every sequence of up to three turns over the roles the named templates handle (and one they do not), texts
    with surrounding whitespace (llama3 and alpaca trim it), plus a longer multi-turn chat."""
    roles, texts = ("system", "user", "assistant", "user_context", "tool"), (" Be brief. ", "w1 w2\n", "w3")
    chats = [[{"role": r, "content": texts[i % 3]} for i, r in enumerate(rs)]
             for n in range(4) for rs in itertools.product(roles, repeat=n)]
    return chats + [[{"role": r, "content": f"w{i}"} for i, r in enumerate(["system"] + ["user", "assistant"] * 3)]]


def _mergekits_template(folder):
    """The template mergekit wrote: its chat_template.jinja (transformers 5 saves it there), else
    tokenizer_config.json's key."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_renders_as_mergekits(tmp_path, mk_outputs, template):
    """Our template renders every conversation of a set (with and without add_generation_prompt) to mergekit's
    text, or both refuse it; the merged model's tokenizer applies it as mergekit's output's does."""
    from transformers import AutoTokenizer

    ours, theirs = _run_both(tmp_path, mk_outputs, f"chat_{template}")
    mine = json.loads((ours / "tokenizer_config.json").read_text())["chat_template"]
    mk = _mergekits_template(theirs)
    rendered = refused = 0
    for chat in _conversations():
        for prompt in (False, True):
            texts = []
            for text in (mine, mk):
                try:
                    texts.append(render_chat(text, chat, add_generation_prompt=prompt))
                except (jinja2.TemplateError, TypeError) as error:
                    texts.append(type(error))
            assert texts[0] == texts[1], (template, [m["role"] for m in chat], prompt)
            rendered, refused = rendered + isinstance(texts[0], str), refused + (not isinstance(texts[0], str))
    print(f"{template}: {rendered} conversations rendered alike, {refused} refused by both")
    assert rendered >= 10  # mistral refuses all but alternating user/assistant turns
    messages = [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1 w2"}]
    loaded = [AutoTokenizer.from_pretrained(p) for p in (ours, theirs)]
    assert loaded[0].chat_template is not None
    assert loaded[0].apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        loaded[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
