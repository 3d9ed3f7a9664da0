"""The named chat templates of a recipe's ``chat_template`` (lightning_merge/tools/chat_templates.py): the texts
they render for a conversation, as transformers renders them, and how a recipe's value is resolved. That each
renders as mergekit's template of that name does: tests/integration/parity/test_parity_mergekit_slices.py."""

import json

import jinja2
import pytest

from lightning_merge.errors import RecipeError
from lightning_merge.tools.chat_templates import TEMPLATES, resolve_template
from lightning_merge.tools.testing import render_chat

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]

#: (conversation, add_generation_prompt) -> text, per template
RENDERED = {
    "chatml": {
        (4, False): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n",
        (2, True): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    },
    "llama3": {
        (4, False): "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"
                    "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>\n",
        (2, True): "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    "alpaca": {
        (4, False): "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nMore?",
        (2, True): "Be brief.\n\n### Instruction:\nHi### Response:\n",
        (3, True): "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!",
    },
    "mistral": {
        (4, False): "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] More? [/INST]",
        (2, True): "<s> [INST] Be brief.\n\nHi [/INST]",
    },
    "exaone": {
        (4, False): "    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]Hi\n        \n\n"
                    "    [|assistant|]Hello!\n        [|endofturn|]\n\n    [|user|]More?\n        \n\n",
        (2, True): "    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]Hi\n        \n\n    [|assistant|]\n",
    },
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_template_renders_its_format(name):
    assert set(RENDERED) == set(TEMPLATES)
    for (turns, prompt), text in RENDERED[name].items():
        assert render_chat(TEMPLATES[name], CHAT[:turns], add_generation_prompt=prompt) == text, (turns, prompt)


def test_templates_without_a_system_message():
    user = [CHAT[1]]
    assert render_chat(TEMPLATES["mistral"], user) == "<s> [INST] Hi [/INST]"
    assert render_chat(TEMPLATES["alpaca"], user) == "\n\n### Instruction:\nHi"
    assert render_chat(TEMPLATES["exaone"], user, add_generation_prompt=True) == \
        "        [|system|][|endofturn|]\n\n    [|user|]Hi\n        \n\n    [|assistant|]\n"
    assert render_chat(TEMPLATES["alpaca"], [CHAT[1], {"role": "user_context", "content": " ctx "}]) == \
        "\n\n### Instruction:\nHi\n\n### Input:\nctx"


def test_mistral_refuses_turns_that_do_not_alternate():
    with pytest.raises(jinja2.TemplateError, match="turn 2 is user"):
        render_chat(TEMPLATES["mistral"], [CHAT[1], CHAT[3]])
    with pytest.raises(jinja2.TemplateError, match="turn 1 is assistant"):
        render_chat(TEMPLATES["mistral"], [CHAT[0], CHAT[2]])


def test_the_renderer_is_transformers():
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    for name, template in TEMPLATES.items():
        for prompt in (False, True):
            rendered, _ = render_jinja_template(conversations=[CHAT], chat_template=template,
                                                add_generation_prompt=prompt, bos_token="<s>", eos_token="</s>")
            assert rendered == [render_chat(template, CHAT, add_generation_prompt=prompt)], name


def test_a_recipes_value_resolves_as_mergekit_resolves_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    assert resolve_template("chatml", recipe, []) is TEMPLATES["chatml"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(jinja, recipe, []) == jinja
    for bad in ("chatm", "{{ x }}", 3):
        with pytest.raises(RecipeError, match="chat_template"):
            resolve_template(bad, recipe, [])
    models = []
    for i, template in enumerate([TEMPLATES["llama3"], TEMPLATES["chatml"], TEMPLATES["chatml"] + "\n", None]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template} if template else {}))
        models.append(folder)
    assert resolve_template("auto", recipe, models) == TEMPLATES["chatml"]  # two of three, compared stripped
    assert resolve_template("auto", recipe, models[3:]) is None
