"""What a folder output holds besides its weights: the files a merge asks for (``files=``: a recipe's
``mergekit_config.yml``, ``config.json``'s layer count, a chat template) and the ``README.md`` model card written from
the provenance. No network call: names are written as the merge knew them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: the recipe a merge from a recipe file writes next to its weights (mergekit's name for it)
RECIPE_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"


def _code(text: Any) -> str:
    """A name as inline code in Markdown (a backtick in it would end the span)."""
    return "`" + str(text).replace("`", "'") + "`"


def model_card(provenance: Mapping[str, Any], name: str, recipe: str | None = None) -> str:
    """The ``README.md`` of a merged model: what made it (library and version, strategy and its arguments, base,
    experts) and the recipe when one was given; Hugging Face's YAML front matter tags it as a merge.

    Args:
        provenance: the merge's provenance (``lightning_merge.json``).
        name: the model's name (the output folder's).
        recipe: the recipe's text, shown as given.
    """
    strategy = dict(provenance.get("strategy") or {})
    method = strategy.pop("name", "?")
    experts = list(provenance.get("experts") or [])
    base = provenance.get("base")
    version = provenance.get("version", "?")
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- lightning-merge",
        *(["- mergekit"] if recipe is not None else []),
        "---",
        f"# {name}",
        "",
        f"This model is a merge of {len(experts)} model{'s' if len(experts) != 1 else ''} made with lightning-merge "
        f"{version}.",
        "",
        "## Merge details",
        "",
        f"- method: {_code(method)}",
    ]
    if strategy:
        lines.append(f"- arguments: {_code(json.dumps(strategy, sort_keys=True, default=str))}")
    lines.append(f"- base: {_code(base)}" if base is not None else "- base: none")
    lines += ["", "### Models merged", ""] + [f"- {_code(e)}" for e in experts]
    if recipe is not None:
        fence = "````" if "```" in recipe else "```"
        lines += ["", "### Recipe", "", "The recipe that produced this model:", "", f"{fence}yaml",
                  recipe.rstrip("\n"), fence]
    lines += ["", "How it was made, exactly (every argument, every input): `lightning_merge.json` in this folder.", ""]
    return "\n".join(lines)


def write_folder_files(folder: Path, files: Sequence[tuple[str, Any]], provenance: Mapping[str, Any],
                       name: str) -> None:
    """Write a merge's extra files into its (temporary) output ``folder`` after the base's support files: text
    (or bytes) replaces a file; a mapping sets keys of a JSON file (the base's copy, or a new one; a mapping under a
    key the file holds as an object sets that object's keys: :func:`merged_keys`); None
    leaves out the base's copy (a merged tokenizer's folder does not keep the base's other tokenizer files). Then
    the model card, ``README.md``, unless ``files`` gives one: it replaces the base's ``README.md`` (which describes
    the base, not this model), as mergekit's card does."""
    given = dict(files)
    for file_name, content in given.items():
        target = folder / file_name
        if content is None:
            if target.is_file() or target.is_symlink():  # a copy in the merge's own temporary folder
                target.unlink()
            continue
        if isinstance(content, Mapping):
            existing: Any = {}
            if target.is_file():
                try:
                    existing = json.loads(target.read_text())
                except (ValueError, UnicodeDecodeError):
                    existing = {}
            existing = merged_keys(existing if isinstance(existing, dict) else {}, content)
            content = json.dumps(existing, indent=2, default=str) + "\n"
        _write_text(target, content)
    if CARD_NAME not in given:
        recipe = given.get(RECIPE_NAME)
        _write_text(folder / CARD_NAME, model_card(provenance, name, recipe if isinstance(recipe, str) else None))


def merged_keys(existing: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    """``existing`` with ``keys`` set, a mapping under a key that ``existing`` holds as a mapping setting that
    mapping's keys (recursively): ``{"text_config": {"tie_word_embeddings": False}}`` changes one key of a
    vision-language model's ``text_config`` and keeps the others."""
    out = dict(existing)
    for key, value in keys.items():
        held = out.get(key)
        out[key] = merged_keys(held, value) if isinstance(value, Mapping) and isinstance(held, Mapping) else value
    return out


def _write_text(path: Path, text: str | bytes) -> None:
    if path.is_symlink():  # a link the base brought along: replaced, never written through
        path.unlink()
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


__all__ = ["CARD_NAME", "RECIPE_NAME", "merged_keys", "model_card", "write_folder_files"]
