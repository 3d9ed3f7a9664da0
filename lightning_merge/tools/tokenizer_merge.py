"""mergekit's ``tokenizer_source`` and ``tokenizer:`` recipe keys: build the output's tokenizer (the base's, a union
of every model's, or a named model's, plus the recipe's ``tokens``), then read every model's token-indexed tensors
(input embeddings, LM head) in that tokenizer's ids (:mod:`lightning_merge.sources.vocabulary`), write the tokenizer
and ``config.json``'s ``vocab_size`` into the output. The rules are mergekit 0.1.5's (``mergekit/tokenizer``), with
three differences, all documented in docs/cli.md:

- mergekit's union adds the tokens the base lacks in an order that follows Python's set and Rust's hash-map
  iteration (it changes from run to run); here they are added model by model in the recipe's order (the base
  first), each model's in its own id order. The same tokens get the same rows; only their ids can differ.
- a non-base model's tokenizer entry whose id is past the model's embedding rows makes mergekit fail (a missing
  permutation key); here the model simply lacks that token.
- ``config.json``'s and ``generation_config.json``'s token ids (``*_token_id``, ``*_token_index``: a
  vision-language model's image tokens, bos/eos/pad; in nested configs too, except the ids of a vocabulary of
  their own) name the output tokenizer's ids of the donor's tokens;
  mergekit keeps the donor's ids, which a tokenizer taken from another model numbers otherwise (the model then
  cannot find its image tokens).

Needs transformers (``pip install 'lightning-merge[tokenizer]'``), imported only when a recipe asks for a tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief
from lightning_merge.sources.expert import Expert
from lightning_merge.sources.vocabulary import TokenSource, VocabularyAlignment, VocabularyPlan, positions_of
from lightning_merge.tools.architectures import meta_model, model_config, saved_parameters, transformers_module

#: files a tokenizer's folder may hold: the donor's copies are replaced by the merged tokenizer's (or removed)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


@dataclass(frozen=True)
class TokenEntry:
    """A recipe's ``tokenizer.tokens`` entry: the row a token takes (see :class:`TokenSource`), as written.

    Args:
        source: a model folder (its row of the token), ``"zero"``, or ``(model folder, token id or token)``.
        force: use it in every model, even those that have the token.
    """

    source: Path | str | tuple[Path, int | str] | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerRecipe:
    """What a recipe asks of the output's tokenizer.

    Args:
        source: ``"base"``, ``"union"`` or a model folder.
        tokens: token → its entry (tokens not in the source's vocabulary are added).
        pad_to_multiple_of: round the output's vocabulary rows up to a multiple of this.
    """

    source: str | Path
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer(config: Mapping[str, Any], recipe: Path, resolve: Callable[[Any, str], Path]
                    ) -> TokenizerRecipe | None:
    """The recipe's ``tokenizer_source`` or ``tokenizer:`` (None: neither). ``resolve(ref, where)`` resolves a model
    reference to its folder.

    Raises:
        RecipeError: both keys, or a value mergekit does not accept.
    """
    if config.get("tokenizer_source") is not None and config.get("tokenizer") is not None:
        raise RecipeError(f"{recipe}: give either 'tokenizer_source' or 'tokenizer', not both (mergekit refuses both)")
    if config.get("tokenizer_source") is not None:
        return TokenizerRecipe(_source(config["tokenizer_source"], recipe, resolve, "tokenizer_source"))
    spec = config.get("tokenizer")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise RecipeError(f"{recipe}: 'tokenizer' must be a mapping with source, tokens and pad_to_multiple_of, got "
                          f"{brief(spec)}")
    unknown = sorted(set(spec) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        raise RecipeError(f"{recipe}: tokenizer has unknown key(s) {', '.join(unknown)}; it takes source, tokens and "
                          "pad_to_multiple_of")
    pad = spec.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"{recipe}: tokenizer.pad_to_multiple_of must be a positive integer, got {brief(pad)}")
    tokens: dict[str, TokenEntry] = {}
    given = spec.get("tokens") or {}
    if not isinstance(given, Mapping):
        raise RecipeError(f"{recipe}: tokenizer.tokens must be a mapping of token -> {{source: ..., force: ...}}, got "
                          f"{brief(given)}")
    for token, entry in given.items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(token, str):
            raise RecipeError(f"{recipe}: {where}: a token must be a string; quote it in the recipe (\"{token}\")")
        if not isinstance(entry, Mapping) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{recipe}: {where} must be a mapping with 'source' and optionally 'force', got "
                              f"{brief(entry)}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{recipe}: {where}.force must be true or false, got {brief(force)}")
        tokens[token] = TokenEntry(_token_source(entry.get("source"), recipe, resolve, where), force)
    return TokenizerRecipe(_source(spec.get("source", "union"), recipe, resolve, "tokenizer.source"), tokens,
                           pad)


def _source(value: Any, recipe: Path, resolve: Callable[[Any, str], Path], where: str) -> str | Path:
    if value in ("base", "union"):
        return value
    if isinstance(value, (str, Mapping)):
        return resolve(value, where)
    raise RecipeError(f"{recipe}: {where} must be 'base', 'union' or a model, got {brief(value)}")


def _token_source(value: Any, recipe: Path, resolve: Callable[[Any, str], Path], where: str) -> Any:
    if value is None:
        raise RecipeError(f"{recipe}: {where} has no source: give a model, {{kind: zero}} or {{kind: model_token, "
                          "model: ..., token: ...}}")
    if isinstance(value, Mapping) and "kind" in value:
        if value["kind"] == "zero" and set(value) == {"kind"}:
            return "zero"
        if value["kind"] == "model_token" and set(value) <= {"kind", "model", "token", "token_id"} and \
                "model" in value and (("token" in value) != ("token_id" in value)):
            ref = value.get("token_id", value.get("token"))
            if isinstance(ref, bool) or not isinstance(ref, (int, str)):
                raise RecipeError(f"{recipe}: {where}: token_id must be an integer and token a string")
            return (resolve(value["model"], f"{where}.source.model"), ref)
        raise RecipeError(f"{recipe}: {where}.source must be {{kind: zero}} or {{kind: model_token, model: M, "
                          f"token: T}} (or token_id: N: one of the two), got {brief(value)}")
    return resolve(value, f"{where}.source")


def _transformers() -> Any:
    return transformers_module("tokenizer merging (tokenizer_source / tokenizer)")


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder, Mapping) and isinstance(holder.get("vocab_size"), int):
            return holder["vocab_size"]
    return None


def _load_tokenizer(folder: Path, what: str) -> Any:
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as err:  # noqa: BLE001  transformers raises many kinds: one clear line
        raise RecipeError(f"{what} '{folder}': its tokenizer cannot be loaded ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); tokenizer merging needs each model's "
                          "tokenizer files in its folder") from None


def _stripped(tokenizer: Any, rows: int, folder: Path) -> Any:
    """The base's tokenizer without the entries whose id has no embedding row (mergekit strips them, BPE only)."""
    vocab = tokenizer.get_vocab()
    unused = {t for t, i in vocab.items() if i >= rows}
    if not unused:
        return tokenizer
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise RecipeError(f"base '{folder}': its tokenizer has {len(unused)} entries past the model's {rows} "
                          f"embedding rows and is a {state['model']['type']} tokenizer; removing them (as mergekit "
                          "does) works for BPE tokenizers only")
    state["added_tokens"] = [e for e in state["added_tokens"] if e["id"] < rows]
    for token in unused:
        state["model"]["vocab"].pop(token, None)

    def kept(merge: Any) -> bool:  # neither side removed, nor what it makes (mergekit keeps that merge, and the
        pair = merge.split(" ") if isinstance(merge, str) else merge  # tokenizer then fails to load)
        return not any(t in unused for t in pair) and "".join(pair) not in unused

    state["model"]["merges"] = [m for m in state["model"]["merges"] if kept(m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


def _union(base: Any, tokenizers: Sequence[tuple[Any, int]]) -> Any:
    """mergekit's union: the base's tokenizer plus every token of the others (ids below their embedding rows) it
    lacks, regular tokens first (as plain added tokens), then the added tokens with their settings (the first
    model's, at a clash)."""
    transformers = _transformers()
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in tokenizers:
        for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if _ < rows:
                regular.setdefault(token, None)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < rows:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy of the base's: it is not changed
        base.save_pretrained(tmp)
        out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
    known = base.get_vocab()
    for token in regular:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def token_indexed_names(folder: Path, names: Sequence[str]) -> frozenset[str]:
    """The tensors of a model folder indexed by token (axis 0): its input and output embeddings (their biases too),
    found as mergekit finds them: the model built from its ``config.json`` on the meta device (no memory, no
    weights), asked for ``get_input_embeddings()`` / ``get_output_embeddings()``.

    Raises:
        RecipeError: no config, a config transformers cannot build, or none of those tensors among ``names``.
    """
    model = meta_model(folder, "tokenizer merging (to find the embeddings)")
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for attribute in ("weight", "bias"):
            parameter = getattr(module, attribute, None) if module is not None else None
            if parameter is not None:
                ids.add(id(parameter))
    found = {n for n, p in saved_parameters(model) if id(p) in ids}  # under the names checkpoints hold too
    present = frozenset(found & set(names))
    if not present:
        raise RecipeError(f"'{folder}': none of its embeddings ({', '.join(sorted(found))}) is among its tensors; "
                          "tokenizer merging needs the checkpoint's names to be the transformers model's")
    return present


@dataclass
class AlignedInputs:
    """The recipe's models read through the output vocabulary, and the files the output gets."""

    experts: list[Expert]
    base: Expert | None
    files: dict[str, Any]
    plan: VocabularyPlan


@dataclass
class OutputVocabulary:
    """The output's tokenizer and every model's rows of its tokens: what aligning any group of the models needs.

    Attributes:
        vocabulary: output token → id.
        size: the output's rows (padded).
        names: the token-indexed tensors.
        files: the output's tokenizer files and ``config.json`` keys.
        positions: per model (its :func:`_key`), its row of each output token (-1: it lacks it).
        rows: per model, its embedding rows.
        folders: per model, the folder of its tokenizer.
        tokens: the recipe's ``tokens`` entries, by token.
        vocabs: per tokenizer folder, its vocabulary (the base's stripped).
        recipe: the recipe's path, for messages.
    """

    vocabulary: dict[str, int]
    size: int
    names: frozenset[str]
    files: dict[str, Any]
    positions: dict[tuple[str, ...], Any]
    rows: dict[tuple[str, ...], int]
    folders: dict[tuple[str, ...], Path]
    tokens: dict[str, TokenEntry]
    vocabs: dict[Path, Mapping[str, int]]
    recipe: Path

    def alignment(self, models: Sequence[Expert], base: Expert | None, group: str = "the models"
                  ) -> tuple[VocabularyAlignment, dict[tuple[str, ...], int]]:
        """The alignment of a group of models (each once; the base's rule applies when ``base`` is among them), and
        each model's index in it.

        Raises:
            RecipeError: a ``tokens`` entry naming a model outside the group.
        """
        experts: dict[tuple[str, ...], Expert] = {}
        for e in models:  # each model once, the first of its views
            experts.setdefault(_key(e), e)
        keys = list(experts)
        index = {k: i for i, k in enumerate(keys)}
        by_folder: dict[Path, int] = {}
        for k in keys:
            by_folder.setdefault(self.folders[k], index[k])
        tokens = {}
        for token, entry in self.tokens.items():
            tokens[token] = _resolve_entry(token, entry, by_folder, self.vocabs, [self.rows[k] for k in keys],
                                           self.recipe, group)
        base_index = index.get(_key(base)) if base is not None else None
        plan = VocabularyPlan(models=[experts[k].name for k in keys], vocabulary=self.vocabulary,
                              positions=[self.positions[k] for k in keys], size=self.size, tokens=tokens,
                              base=base_index, names=self.names)
        return VocabularyAlignment(plan, [experts[k] for k in keys]), index

    def aligner(self, models: Sequence[Expert], base: Expert | None, group: str = "the models"
                ) -> Callable[[Expert], Expert]:
        """A function giving the aligned view of each of ``models`` (see :meth:`alignment`)."""
        alignment, index = self.alignment(models, base, group)
        return lambda expert: alignment.expert(index[_key(expert)], expert)


def output_vocabulary(spec: TokenizerRecipe, members: Sequence[tuple[Expert, Path]], recipe: Path,
                      chat_template: str | None = None) -> OutputVocabulary:
    """Build the output tokenizer of a recipe's models and each model's rows of its tokens.

    Args:
        spec: the recipe's tokenizer.
        members: every model and the folder of its tokenizer (a LoRA expert's: its model's), the tokenizer's base
            first (the recipe's base, else its first model).
        recipe: the recipe's path, for messages.
        chat_template: the template the output's tokenizer gets (the recipe's ``chat_template``, resolved).

    Raises:
        RecipeError: a tokenizer that cannot be loaded, an entry naming a model or token not there.
    """
    expert_of: dict[tuple[str, ...], Expert] = {}
    folder_of: dict[tuple[str, ...], Path] = {}
    for e, f in members:  # each model once: a model is the files it reads
        if expert_of.setdefault(_key(e), e) is e:
            folder_of.setdefault(_key(e), f.resolve())
    keys = list(expert_of)
    folders = list(dict.fromkeys(folder_of.values()))
    configs = {f: model_config(f) for f in folders}
    tokenizers = {f: _load_tokenizer(f, "model") for f in folders}
    first = expert_of[keys[0]]
    names = token_indexed_names(folder_of[keys[0]], first.names())
    probe = sorted(names)[0]
    rows: dict[tuple[str, ...], int] = {}
    for k in keys:
        if probe not in expert_of[k]:
            raise RecipeError(f"{recipe}: model '{expert_of[k].name}' has no tensor '{probe}' (a token-indexed tensor "
                              f"of '{first.name}'); the models' architectures must match")
        rows[k] = expert_of[k].spec(probe).shape[0]
        size = _vocab_size(configs[folder_of[k]])
        if size is not None:
            rows[k] = min(rows[k], size)
    base_folder = folder_of[keys[0]]
    base_tokenizer = _stripped(tokenizers[base_folder], rows[keys[0]], base_folder)
    vocabs: dict[Path, Mapping[str, int]] = {f: tokenizers[f].get_vocab() for f in folders}
    vocabs[base_folder] = base_tokenizer.get_vocab()
    if spec.source == "base":
        out = base_tokenizer
    elif spec.source == "union":
        most = {f: max(rows[k] for k in keys if folder_of[k] == f) for f in folders}
        out = _union(base_tokenizer, [(base_tokenizer if f == base_folder else tokenizers[f], most[f])
                                      for f in folders])
    else:
        out = _load_tokenizer(Path(spec.source), "tokenizer_source")
    existing = set(out.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    if chat_template is not None:
        out.chat_template = chat_template
    vocabulary = dict(out.get_vocab())
    size = len(vocabulary)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    positions = {k: positions_of(vocabulary, vocabs[folder_of[k]], rows[k]) for k in keys}
    most = [max(rows[k] for k in keys if folder_of[k] == f) for f in folders]
    for token, entry in spec.tokens.items():  # checked once against every model, before any tensor is read
        _resolve_entry(token, entry, {f: i for i, f in enumerate(folders)}, vocabs, most, recipe)
    files = _output_files(out, base_folder, configs[base_folder], size, vocabs[base_folder], vocabulary)
    return OutputVocabulary(vocabulary, size, names, files, positions, rows, folder_of, dict(spec.tokens), vocabs,
                            recipe)


def align_vocabularies(spec: TokenizerRecipe, base: tuple[Expert, Path] | None,
                       experts: Sequence[tuple[Expert, Path]], recipe: Path, chat_template: str | None = None
                       ) -> AlignedInputs:
    """Build the output tokenizer and read every model's token-indexed tensors in its ids.

    Args:
        spec: the recipe's tokenizer.
        base: the base expert and the folder holding its tokenizer (None without a base: the first model is).
        experts: each expert and the folder holding its tokenizer (a LoRA expert's: its model's).
        recipe: the recipe's path, for messages.
        chat_template: the template the output's tokenizer gets (the recipe's ``chat_template``, resolved).

    Returns:
        The aligned experts and base, and the output's tokenizer files and ``config.json`` keys.

    Raises:
        RecipeError: a tokenizer that cannot be loaded, an entry naming a model or token not there.
    """
    members = ([base] if base is not None else []) + list(experts)
    vocabulary = output_vocabulary(spec, members, recipe, chat_template)
    alignment, index = vocabulary.alignment([e for e, _ in members], None if base is None else base[0])
    aligned = [alignment.expert(index[_key(e)], e) for e, _ in experts]
    aligned_base = alignment.expert(index[_key(base[0])], base[0]) if base is not None else None
    return AlignedInputs(aligned, aligned_base, vocabulary.files, alignment.plan)


def _key(expert: Expert) -> tuple[str, ...]:
    """A model's identity: the files it reads (the base listed again among the models is the base)."""
    return tuple(str(s) for s in expert.sources())


def _resolve_entry(token: str, entry: TokenEntry, by_folder: Mapping[Path, int],
                   vocab_of: Mapping[Path, Mapping[str, int]], rows: Sequence[int], recipe: Path,
                   group: str = "the merged models") -> TokenSource:
    where = f"{recipe}: tokenizer.tokens[{token!r}]"
    if entry.source == "zero":
        return TokenSource(model=None, force=entry.force)
    folder, ref = entry.source if isinstance(entry.source, tuple) else (entry.source, None)
    folder = Path(folder).resolve()
    if folder not in by_folder:
        raise RecipeError(f"{where} takes its row from '{folder}', which is not one of {group}")
    model = by_folder[folder]
    if ref is None:
        if not 0 <= vocab_of[folder].get(token, -1) < rows[model]:  # the row of this very token: it must have it
            raise RecipeError(f"{where} takes its row from '{folder}', whose tokenizer lacks {token!r} (or has it past "
                              "the model's rows); name a model that has it, or take a row of another token: "
                              "{kind: model_token, model: ..., token: ...}")
        return TokenSource(model=model, force=entry.force)
    if isinstance(ref, str):
        if ref not in vocab_of[folder]:
            raise RecipeError(f"{where}: token {ref!r} is not in the tokenizer of '{folder}'")
        ref = vocab_of[folder][ref]
    if not 0 <= ref < rows[model]:
        raise RecipeError(f"{where}: token_id {ref} is out of range for '{folder}' (it has {rows[model]} rows)")
    return TokenSource(model=model, row=ref, force=entry.force)


def _output_files(tokenizer: Any, donor: Path, config: Mapping[str, Any], size: int,
                  donor_vocabulary: Mapping[str, int], vocabulary: Mapping[str, int]) -> dict[str, Any]:
    """The output's tokenizer files (the merged tokenizer's, as transformers saves it; the donor's other tokenizer
    files left out), ``config.json``'s vocabulary size and renumbered token ids, and ``generation_config.json``'s
    renumbered token ids (:func:`_renumbered_token_ids`)."""
    files: dict[str, Any] = {name: None for name in TOKENIZER_FILES if (donor / name).is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for item in sorted(Path(tmp).iterdir()):
            if item.is_file():
                files[item.name] = item.read_bytes()
    if config:
        keys = _renumbered_token_ids(config, donor_vocabulary, vocabulary)
        if isinstance(config.get("vocab_size"), int) or not isinstance(config.get("text_config"), Mapping):
            keys["vocab_size"] = size
        else:  # that key of it (engine.card.merged_keys)
            keys["text_config"] = {**keys.get("text_config", {}), "vocab_size": size}
        files["config.json"] = keys
    generation = model_config(donor, "generation_config.json")
    if generation and (keys := _renumbered_token_ids(generation, donor_vocabulary, vocabulary)):
        files["generation_config.json"] = keys
    return files


def _renumbered_token_ids(config: Mapping[str, Any], donor_vocabulary: Mapping[str, int],
                          vocabulary: Mapping[str, int]) -> dict[str, Any]:
    """The keys of ``config.json`` that name a token by its id in the donor's tokenizer (``*_token_id``,
    ``*_token_index``: a vision-language model's image tokens, which its model finds in ``input_ids`` by that id;
    ``bos``/``eos``/``pad``), set to the output tokenizer's id of that token where it differs (a tokenizer from
    another model numbers its tokens its own way; mergekit keeps the donor's ids). An id the donor's tokenizer does
    not have, or a token the output's lacks, is kept.

    Nested configs are followed to any depth (``text_config``, ``vision_config``, an omni model's
    ``thinker_config``). One whose ``vocab_size`` cannot hold the donor tokenizer's ids numbers some tokens in a
    vocabulary of its own (a speech ``talker_config``'s codec ids): there an id below that size may be one of its
    own and is kept, and an id at or past it can only be the tokenizer's and is renumbered (the talker's image and
    audio token ids)."""
    by_id = {i: token for token, i in donor_vocabulary.items()}
    needed = max(by_id, default=-1) + 1  # rows a vocabulary of the donor's tokenizer holds at least

    def renumbered(value: Any, own: int) -> Any:
        if isinstance(value, list):
            return [renumbered(v, own) for v in value]
        if isinstance(value, bool) or not isinstance(value, int) or value < own or by_id.get(value) not in vocabulary:
            return value
        return vocabulary[by_id[value]]

    def changed(holder: Mapping[str, Any], own: int) -> dict[str, Any]:
        keys: dict[str, Any] = {}
        for key, value in holder.items():
            if isinstance(value, Mapping):
                size = value.get("vocab_size")
                inner = changed(value, size if isinstance(size, int) and not isinstance(size, bool)
                                and size < needed else own)
                if inner:
                    keys[key] = inner
            elif key.endswith(("_token_id", "_token_index")) and (new := renumbered(value, own)) != value:
                keys[key] = new
        return keys

    return changed(config, 0)


__all__ = ["AlignedInputs", "OutputVocabulary", "TokenEntry", "TokenizerRecipe", "align_vocabularies",
           "output_vocabulary", "parse_tokenizer", "token_indexed_names"]
