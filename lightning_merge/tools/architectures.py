"""What a Hugging Face model folder's architecture says about its tensors, read the way mergekit reads it: the model
is built from the folder's ``config.json`` on the meta device (no memory, no weights) with transformers, and asked.

- :func:`meta_model`: that model.
- :func:`tied_groups`: the names that share one parameter (an LM head tied to the input embedding).
- :func:`with_tied_tensors`: a recipe's models, each answering to the tied names its checkpoint left out whenever
  another model holds that name as a tensor of its own (a base with tied embeddings merged with experts that
  trained their own LM head): mergekit's ``tied_names`` rule.

Needs transformers (``pip install 'lightning-merge[tokenizer]'``), imported only when a recipe needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.sources.expert import Expert
from lightning_merge.sources.tied import TiedExpert


def model_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """``folder/config.json`` (or ``folder/name``) as a mapping; empty when it is missing, unreadable or not a
    mapping."""
    import json

    try:
        config = json.loads((folder / name).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def transformers_module(why: str) -> Any:
    """transformers, or a RecipeError saying what needs it and how to install it."""
    try:
        import transformers
    except ImportError:
        raise RecipeError(f"{why} needs transformers: pip install 'lightning-merge[tokenizer]' (or transformers)"
                          ) from None
    return transformers


def meta_model(folder: Path, why: str, **overrides: Any) -> Any:
    """The transformers model of ``folder``'s ``config.json``, built on the meta device.

    Args:
        folder: a model folder.
        why: what asks (for messages), e.g. ``"tokenizer merging"``.
        overrides: config values set over the file's (``tie_word_embeddings=True``: at the top level and in the
            text model's config, which a vision-language model's text decoder takes its tie from: Llama 4's from
            there alone).

    Raises:
        RecipeError: no config, or one transformers cannot build.
    """
    transformers = transformers_module(why)
    import torch

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **overrides)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"'{folder}': {why} reads config.json to know the architecture, and it cannot be read "
                          f"({type(err).__name__}: {err})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "tie_word_embeddings" in overrides and text is not config:
        text.tie_word_embeddings = overrides["tie_word_embeddings"]
    named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)  # the config's class
    builders = [transformers.AutoModelForCausalLM.from_config]  # then a vision-language model's own class
    builders += ([named._from_config] if hasattr(named, "_from_config") else []) + [transformers.AutoModel.from_config]
    # a model built from a part of the config is not the checkpoint's: AutoModelForCausalLM builds Llama 4's
    # text-only Llama4ForCausalLM from its text_config (model.*, where the checkpoint holds language_model.model.*);
    # the config's own class is tried next, and that model is kept only when nothing builds the whole config
    partial = None
    for build in builders:
        try:
            with torch.device("meta"):
                model = build(config)
        except Exception:  # noqa: BLE001, S112  the next kind of model
            continue
        if type(model.config) is type(config):
            return model
        partial = partial if partial is not None else model
    if partial is not None:
        return partial
    raise RecipeError(f"'{folder}': transformers cannot build its architecture ({config.model_type}), which {why} "
                      "needs to know")


def tied_groups(folder: Path, why: str = "reading tied weights", assume_tied: bool = False) -> list[tuple[str, ...]]:
    """The groups of parameter names of ``folder``'s architecture that are one parameter (tied), each in the
    model's order (the input embedding before the LM head), then under the names its checkpoints hold where they
    differ (:func:`saved_parameters`); empty when nothing is tied. ``assume_tied``: read as if its config said
    ``tie_word_embeddings: true``, at the top level and in its ``text_config`` (a config silent on it, or saying
    it at one level only, read as mergekit reads it)."""
    model = meta_model(folder, why, **({"tie_word_embeddings": True} if assume_tied else {}))
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    tied = {key for key, group in names.items() if len(group) > 1}
    for name, parameter in saved_parameters(model):  # the names its checkpoints hold, where they differ
        if id(parameter) in tied and name not in names[id(parameter)]:
            names[id(parameter)].append(name)
    return [tuple(names[key]) for key in names if key in tied]


def saved_parameters(model: Any) -> list[tuple[str, Any]]:
    """``model.named_parameters(remove_duplicate=False)``, each also under the name transformers saves it with when
    that differs (transformers 5 builds a vision-language model's text decoder as ``model.language_model.*`` and
    saves, as its checkpoints on the hub hold it, ``model.*``), the model's names first.

    Args:
        model: a transformers model (from :func:`meta_model`).
    """
    live = list(model.named_parameters(remove_duplicate=False))
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, dict(live))
    except Exception:  # noqa: BLE001  transformers 4 (saves the names it builds) or a conversion it cannot revert
        return live
    known = {name for name, _ in live}
    return live + [(name, p) for name, p in saved.items() if name not in known and hasattr(p, "shape")]


def with_tied_tensors(models: Sequence[tuple[Expert, Path]], recipe: Path) -> list[Expert]:
    """Each model, answering also to the tied names its checkpoint left out that another model holds (see the
    module's docstring); the others unchanged. transformers is imported only when some model lacks a tensor
    another holds and its ``config.json`` does not say ``tie_word_embeddings: false``; when the architecture
    cannot be read and the config does not say it ties, the model is left as it is (the merge's own check then
    names the missing tensor). A config that does not say is read as tied, as mergekit reads such a model (its
    architectures' ``tied_names`` do not depend on the config).

    Args:
        models: each model and the folder of its ``config.json``.
        recipe: the recipe's path, for messages.

    Returns:
        The models in the same order; a changed one is a :class:`~lightning_merge.sources.tied.TiedExpert`.

    Raises:
        RecipeError: the config says ``tie_word_embeddings: true`` and transformers is missing or cannot build it.
    """
    held = [set(expert.names()) for expert, _ in models]
    every = set().union(*held) if held else set()
    out: list[Expert] = []
    groups_of: dict[Path, list[tuple[str, ...]]] = {}
    for (expert, folder), names in zip(models, held):
        missing = every - names
        ties = _ties_word_embeddings(folder)
        if not missing or ties is False:
            out.append(expert)
            continue
        folder = folder.resolve()
        if folder not in groups_of:
            why = (f"reading the tied weights of '{expert.name}' (it lacks '{sorted(missing)[0]}', which another "
                   f"model of {recipe} holds)")
            try:
                # tied at either level or silent: read tied at both, as mergekit reads it (its tied_names do not
                # depend on the config), where transformers may tie by one level alone (Llama 4 by text_config's)
                groups_of[folder] = tied_groups(folder, why, assume_tied=True)
            except RecipeError:
                if ties:  # it says it ties them: say what reading the tie needs
                    raise
                groups_of[folder] = []  # not knowable: the merge's own check names the missing tensor
        tied = {}
        for group in groups_of[folder]:
            target = next((n for n in group if n in names), None)
            if target is not None:
                tied.update({n: target for n in group if n in missing})
        out.append(TiedExpert(expert, tied) if tied else expert)
    return out


def untied_config(donor: Expert) -> dict[str, Any]:
    """``config.json``'s keys for a merge whose config comes from ``donor``: ``tie_word_embeddings: false`` when
    the donor is a model read with its tied tensors (:func:`with_tied_tensors`), since the output then holds an LM
    head of its own (merged from the models that trained one), which a tying config would make transformers
    replace by the embedding on load; else none. Set at the top level, and in ``text_config`` too when that says
    it (a vision-language model's: transformers 5 takes the tie from there first). Not for an encoder-decoder
    (``is_encoder_decoder``: T5, Whisper), where the flag means more than the tie (T5's decoder output scaling) and
    transformers 5 ties the head whatever it says: its config is kept, as mergekit keeps it."""
    if not isinstance(donor, TiedExpert):
        return {}
    config = model_config(Path(donor.path)) if donor.path is not None else {}
    if config.get("is_encoder_decoder"):
        return {}
    text = config.get("text_config")
    nested = {"text_config": {"tie_word_embeddings": False}} if isinstance(text, dict) and \
        "tie_word_embeddings" in text else {}
    return {"tie_word_embeddings": False, **nested}


def _ties_word_embeddings(folder: Path) -> bool | None:
    """``config.json``'s ``tie_word_embeddings``: True when its top level or its ``text_config`` says true (a
    vision-language model: transformers 5 ties the head when either does, Llama 4's by ``text_config``'s alone; read
    tied here either way, as mergekit reads it), False when what they say is false; None
    when it has no config or neither says (then read as tied, as mergekit does); False without a config."""
    if not (folder / "config.json").is_file():
        return False
    config = model_config(folder)
    said = [holder["tie_word_embeddings"] for holder in (config, config.get("text_config"))
            if isinstance(holder, dict) and isinstance(holder.get("tie_word_embeddings"), bool)]
    return any(said) if said else None


__all__ = ["meta_model", "model_config", "saved_parameters", "tied_groups", "transformers_module", "untied_config",
           "with_tied_tensors"]
