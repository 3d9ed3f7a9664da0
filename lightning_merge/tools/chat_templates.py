"""mergekit's ``chat_template`` recipe key: a template name (``chatml``, ``llama3``, ``alpaca``, ``mistral``,
``exaone``), ``auto`` (the template most of the input models have) or a Jinja template, written into the output's
``tokenizer_config.json`` (and its ``chat_template.jinja`` when the base has one), checked as mergekit 0.1.5 checks it
(``mergekit/merge.py: _set_chat_template``). The named templates are mergekit's own texts (its
``_data/chat_templates``, LGPL-3.0), so a recipe naming one gives mergekit's file."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief

#: mergekit 0.1.5's named templates, verbatim
TEMPLATES: dict[str, str] = {
    'alpaca': (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if "
        "(messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n"
        '\n'
        '{% for message in messages %}\n'
        "{% if message['role'] == 'user' %}\n"
        '### Instruction:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'assistant' %}\n"
        '### Response:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'user_context' %}\n"
        '### Input:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        '{% endif %}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n"
        '### Response:\n'
        '{% endif %}\n'
    ),
    'chatml': (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message"
        "['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    'exaone': (
        '{% for message in messages %}\n'
        "    {% if loop.first and message['role'] != 'system' %}\n"
        "        {{ '[|system|][|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        "    {{ '[|' + message['role'] + '|]' + message['content'] }}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        {{ '\\n' }}\n"
        '    {% else %}\n'
        "        {{ '[|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        '{% endfor %}\n'
        '{% if add_generation_prompt %}\n'
        "    {{ '[|assistant|]' }}\n"
        '{% endif %}\n'
    ),
    'llama3': (
        '{% set loop_messages = messages %}\n'
        '{% for message in loop_messages %}\n'
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\"
        "n'+ message['content'] | trim + '<|eot_id|>' %}\n"
        '{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n'
        '{{ content }}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\"
        "n\\n' }}{% endif %}\n"
    ),
    'mistral': (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        '    {%- set loop_messages = messages[1:] %}\n'
        '{%- else %}\n'
        '    {%- set loop_messages = messages %}\n'
        '{%- endif %}\n'
        '\n'
        '{{- bos_token }}\n'
        '{%- for message in loop_messages %}\n'
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation rol"
        "es must alternate user/assistant/user/assistant/...') }}\n"
        '    {%- endif %}\n'
        "    {%- if message['role'] == 'user' %}\n"
        '        {%- if loop.first and system_message is defined %}\n'
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        '        {%- else %}\n'
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        '        {%- endif %}\n'
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        '    {%- else %}\n'
        "        {{- raise_exception('Only user and assistant roles are supported, with t"
        "he exception of an initial optional system message!') }}\n"
        '    {%- endif %}\n'
        '{%- endfor %}\n'
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
