"""mergekit's ``chat_template`` recipe key: a template name (``chatml``, ``llama3``, ``alpaca``, ``mistral``,
``exaone``), ``auto`` (the template most of the input models have) or a Jinja template, written into the output's
``tokenizer_config.json`` (and its ``chat_template.jinja`` when the base has one), checked as mergekit 0.1.5 checks it
(``mergekit/merge.py: _set_chat_template``). The named templates are written here from each format's public
definition; each renders the text mergekit's template of that name renders (see ``TEMPLATES``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief

#: The named templates, written here from each format's public definition. Each renders, under transformers'
#: ``apply_chat_template``, the same text as mergekit 0.1.5's template of that name (its whitespace included, noted
#: below where it is unusual), so a merged model prompts as mergekit's merge of the same recipe does.
#: tests/unit/tools/test_chat_templates.py pins the rendered texts; tests/integration/parity/
#: test_parity_mergekit_slices.py renders a set of conversations with each and with the template mergekit writes
#: into its output, and asserts equal strings (and that both refuse the same conversations).
TEMPLATES: dict[str, str] = {
    # ChatML: each turn is <|im_start|>{role}\n{content}<|im_end|>\n, any role; the prompt opens an assistant turn
    "chatml": (
        r"{%- for message in messages -%}"
        r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    # Llama 3: bos_token, then each turn <|start_header_id|>{role}<|end_header_id|>\n\n{content, trimmed}<|eot_id|>
    # and (as mergekit's renders) a line end; the prompt opens an assistant header
    "llama3": (
        r"{%- for message in messages -%}"
        r"{%- set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        r" + message['content'] | trim + '<|eot_id|>\n' -%}"
        r"{{- bos_token + turn if loop.first else turn -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
    ),
    # Alpaca: the last system message's text (trimmed; empty without one) and a blank line, then a section per
    # user (### Instruction:), assistant (### Response:) and user_context (### Input:) turn, its text trimmed,
    # a blank line after it unless it is the last message; other roles are not shown. The prompt is
    # "### Response:\n" unless the last turn is the assistant's; as mergekit's renders, it follows the last
    # section with no blank line between.
    "alpaca": (
        r"{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        r"{%- set headers = {'user': '### Instruction:\n', 'assistant': '### Response:\n',"
        r" 'user_context': '### Input:\n'} -%}"
        r"{{- (systems[-1]['content'] | trim if systems else '') + '\n\n' -}}"
        r"{%- for message in messages -%}"
        r"{%- if message['role'] in headers -%}"
        r"{{- headers[message['role']] + message['content'] | trim + ('' if loop.last else '\n\n') -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\n' -}}"
        r"{%- endif -%}"
    ),
    # Mistral (v1): bos_token, then " [INST] {user} [/INST]" and " {assistant}{eos_token}" turns, which must
    # alternate from a user turn; a first system message goes before the first user text, a blank line between.
    # [/INST] already prompts the reply, so add_generation_prompt adds nothing.
    "mistral": (
        r"{%- set has_system = messages[0]['role'] == 'system' -%}"
        r"{%- set turns = messages[1:] if has_system else messages -%}"
        r"{{- bos_token -}}"
        r"{%- for message in turns -%}"
        r"{%- set expected = 'user' if loop.index0 is even else 'assistant' -%}"
        r"{%- if message['role'] != expected -%}"
        r"{{- raise_exception('the mistral chat template takes an optional first system message, then user and "
        r"assistant turns alternating from a user turn; turn ' ~ loop.index ~ ' is ' ~ message['role']) -}}"
        r"{%- elif message['role'] == 'user' -%}"
        r"{%- set text = messages[0]['content'] + '\n\n' + message['content'] if loop.first and has_system "
        r"else message['content'] -%}"
        r"{{- ' [INST] ' + text + ' [/INST]' -}}"
        r"{%- else -%}"
        r"{{- ' ' + message['content'] + eos_token -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
    ),
    # EXAONE: each turn [|{role}|]{content}, ended by a line end and, after a non-user turn, [|endofturn|]; an
    # empty [|system|][|endofturn|] turn leads when the first message is not a system message; the prompt is
    # [|assistant|]. mergekit's template is indented, and transformers' lstrip_blocks strips the indentation
    # before block tags but not before output, so its text carries 4 spaces before each turn and 8 before each
    # turn end, with blank lines between; ours writes the same text.
    "exaone": (
        r"{%- set indent = '    ' -%}"
        r"{%- for message in messages -%}"
        r"{%- if loop.first and message['role'] != 'system' -%}"
        r"{{- indent * 2 + '[|system|][|endofturn|]\n\n' -}}"
        r"{%- endif -%}"
        r"{{- indent + '[|' + message['role'] + '|]' + message['content'] + '\n' -}}"
        r"{{- indent * 2 + ('\n\n' if message['role'] == 'user' else '[|endofturn|]\n\n') -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- indent + '[|assistant|]\n' -}}{%- endif -%}"
    ),
}


def model_template(folder: Path) -> str | None:
    """A model folder's chat template: its ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (the ``default`` one of a list of named templates); None when it has none."""
    if not folder.is_dir():
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    config = folder / "tokenizer_config.json"
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(found, list):  # [{name, template}, ...]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(found, dict):
        found = found.get("default")
    return found if isinstance(found, str) and found else None


def resolve_template(value: Any, recipe: Path, models: Sequence[Path]) -> str | None:
    """The template text a recipe's ``chat_template`` asks for (None: ``auto`` found none among ``models``).

    Raises:
        RecipeError: not text, or neither a known name nor a Jinja template (mergekit's "Invalid chat template").
    """
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{recipe}: chat_template must be a template name ({', '.join(sorted(TEMPLATES))}), "
                          f"'auto' or a Jinja template, got {brief(value)}")
    if value == "auto":  # the most common template among the input models (their first, at a tie: mergekit's)
        found = [t.strip() for t in (model_template(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"{recipe}: chat_template {brief(value)} is neither a template name "
                          f"({', '.join(sorted(TEMPLATES))}, or auto) nor a Jinja template")
    return value


def chat_template_files(value: Any, recipe: Path, donor: Path, models: Sequence[Path]) -> dict[str, Any]:
    """The files of an output folder that carry a recipe's ``chat_template``: ``tokenizer_config.json``'s
    ``chat_template`` key (the donor's file, the key set), and ``chat_template.jinja`` when the donor has one (it
    takes precedence when transformers loads the tokenizer). ``{}`` without a template.

    Args:
        value: the recipe's ``chat_template`` (None: none).
        recipe: the recipe's path, for messages.
        donor: the folder whose tokenizer the output copies (the base, else the first model).
        models: the input models (for ``auto``).

    Raises:
        RecipeError: an invalid template, or a donor without ``tokenizer_config.json`` to hold it.
    """
    if value is None:
        return {}
    unique = list(dict.fromkeys([donor, *models]))
    text = resolve_template(value, recipe, unique)
    if text is None:
        return {}
    if not (donor / "tokenizer_config.json").is_file():
        raise RecipeError(f"{recipe}: chat_template needs a tokenizer in the output, but '{donor}' (whose tokenizer "
                          "files the output copies) has no tokenizer_config.json; add the tokenizer to that folder")
    files: dict[str, Any] = {"tokenizer_config.json": {"chat_template": text}}
    if (donor / "chat_template.jinja").is_file():
        files["chat_template.jinja"] = text
    return files


__all__ = ["TEMPLATES", "chat_template_files", "model_template", "resolve_template"]
