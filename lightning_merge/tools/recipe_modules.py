"""mergekit's ``modules`` in a recipe: a model with several stacks of layers (a vision-language model's text decoder,
vision tower and projector; an encoder-decoder's encoder and decoder) merged module by module, each module with its
own ``models`` or ``slices`` and ``parameters``, as mergekit 0.1.5 plans them (``mergekit/plan.py``):

- a module's ``models`` are one slice of every model's whole stack (the base added as a source when the recipe has
  one and the module does not list it); its ``slices`` are planned as a recipe's (:mod:`.recipe_slices`), over
  that module's tensors and layer stack only, its layers numbered from 0 in the output;
- a parameter is looked up in the source's ``parameters``, then the slice's, then the module's, then the recipe's;
- ``config.json`` gets each module's output layer count under its key (``vision_config.depth``).

The modules of each architecture are those of mergekit's architecture definitions, under the same names
(:data:`ARCHITECTURE_MODULES`), described here by the tensor-name prefixes each module owns and the prefix of its
layer stack. Two differences, both documented in docs/cli.md: every module of the architecture must be listed (mergekit
writes only the listed modules' tensors, a model missing its other parts), and a tensor that belongs to no module
is named in a warning (mergekit leaves it out silently; so does this).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief
from lightning_merge.sources.composed import ComposedExpert
from lightning_merge.sources.expert import Expert
from lightning_merge.tools import mergekit_parameters as mp
from lightning_merge.tools import recipe_slices
from lightning_merge.tools.architectures import model_config
from lightning_merge.tools.recipe_slices import Slice, Sliced, Source, Stack

log = logging.getLogger("lightning_merge")


@dataclass(frozen=True)
class ModuleSpec:
    """One module of an architecture.

    Args:
        owns: the tensor-name prefixes the module owns (a tensor belongs to the module owning its longest matching
            prefix).
        stack: where its layers are (``Stack(None)``: it has none).
    """

    owns: tuple[str, ...]
    stack: Stack


def _vl(text: str, text_layers: str, vision: str, vision_layers: str, vision_counts: tuple[str, ...],
        projector: tuple[str, ...], vision_name: str = "vision_tower", projector_layers: str | None = None,
        text_head: str = "lm_head.") -> dict[str, ModuleSpec]:
    """A vision-language model's three modules (mergekit's names)."""
    return {
        "text_decoder": ModuleSpec((text, text_head), Stack(text_layers, ("num_hidden_layers",
                                                                           "text_config.num_hidden_layers"))),
        vision_name: ModuleSpec((vision,), Stack(vision_layers, vision_counts)),
        "multi_modal_projector": ModuleSpec(projector, Stack(projector_layers)),
    }


#: the modules of the architectures mergekit 0.1.5 defines with several (``config.json``'s ``architectures[0]``)
ARCHITECTURE_MODULES: dict[str, dict[str, ModuleSpec]] = {
    "Qwen2VLForConditionalGeneration": _vl("model.", "model.layers.", "visual.", "visual.blocks.",
                                           ("vision_config.depth",), ("visual.merger.",)),
    "Qwen2_5_VLForConditionalGeneration": _vl("model.", "model.layers.", "visual.", "visual.blocks.",
                                              ("vision_config.depth",), ("visual.merger.",)),
    "Qwen3VLForConditionalGeneration": _vl(
        "model.language_model.", "model.language_model.layers.", "model.visual.", "model.visual.blocks.",
        ("vision_config.depth",), ("model.visual.merger.", "model.visual.deepstack_merger_list."),
        projector_layers="model.visual.deepstack_merger_list."),
    "Qwen3VLMoeForConditionalGeneration": _vl(
        "model.language_model.", "model.language_model.layers.", "model.visual.", "model.visual.blocks.",
        ("vision_config.depth",), ("model.visual.merger.", "model.visual.deepstack_merger_list."),
        projector_layers="model.visual.deepstack_merger_list."),
    "Gemma3ForConditionalGeneration": _vl(
        "language_model.", "language_model.model.layers.", "vision_tower.",
        "vision_tower.vision_model.encoder.layers.", ("vision_config.num_hidden_layers",),
        ("multi_modal_projector.",), text_head="language_model.lm_head."),
    "Mistral3ForConditionalGeneration": _vl(
        "language_model.", "language_model.model.layers.", "vision_tower.", "vision_tower.transformer.layers.",
        ("vision_config.num_hidden_layers",), ("multi_modal_projector.",), text_head="language_model.lm_head."),
    "Llama4ForConditionalGeneration": _vl(
        "language_model.", "language_model.model.layers.", "vision_model.", "vision_model.model.layers.",
        ("vision_config.num_hidden_layers",), ("multi_modal_projector.",), vision_name="vision_model",
        text_head="language_model.lm_head."),
    "T5ForConditionalGeneration": {
        "encoder": ModuleSpec(("encoder.",), Stack("encoder.block.", ("num_layers", "num_hidden_layers"))),
        "decoder": ModuleSpec(("decoder.",), Stack("decoder.block.", ("num_decoder_layers", "num_layers"))),
        "shared": ModuleSpec(("shared.", "lm_head."), Stack(None)),
    },
    "WhisperForConditionalGeneration": {
        "encoder": ModuleSpec(("model.encoder.",), Stack("model.encoder.layers.", ("encoder_layers",))),
        "decoder": ModuleSpec(("model.decoder.", "proj_out."), Stack("model.decoder.layers.", ("decoder_layers",))),
    },
}

_MODULE_KEYS = {"models", "slices", "parameters"}


def architecture_of(folder: Path, recipe: Path) -> tuple[str, dict[str, ModuleSpec]]:
    """The architecture named by ``folder``'s ``config.json`` and its modules.

    Raises:
        RecipeError: no config, or an architecture without modules.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
        name = config["architectures"][0]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise RecipeError(f"{recipe}: 'modules' needs the architecture, from '{folder}/config.json' "
                          "(its 'architectures' list), which cannot be read") from None
    if name not in ARCHITECTURE_MODULES:
        raise RecipeError(f"{recipe}: 'modules': '{folder}' is a {name}, which has one stack of layers (no modules);"
                          f" use 'models' or 'slices'. Architectures with modules: "
                          f"{', '.join(sorted(ARCHITECTURE_MODULES))}")
    return name, ARCHITECTURE_MODULES[name]


def module_of(name: str, modules: Mapping[str, ModuleSpec]) -> str | None:
    """The module owning tensor ``name`` (its longest matching prefix), or None."""
    best = max(((len(p), m) for m, spec in modules.items() for p in spec.owns if name.startswith(p)), default=None)
    return None if best is None else best[1]


@dataclass
class Modules:
    """The merge a ``modules`` recipe asks for: a :class:`~.recipe_slices.Sliced` over every module, and the
    ``config.json`` keys of the modules' layer counts."""

    sliced: Sliced
    config: dict[str, Any]


def referenced_models(value: Any, recipe: Path, resolve: Callable[[Any, str], Path]) -> list[Path]:
    """Every model the modules name, in the recipe's order (checks the modules' shape first).

    Raises:
        RecipeError: naming the key and what is expected.
    """
    if not isinstance(value, Mapping) or not value:
        raise RecipeError(f"{recipe}: 'modules' must be a mapping of module name to {{models: [...]}} or "
                          f"{{slices: [...]}}, got {brief(value)}")
    found: list[Path] = []
    for module, entry in value.items():
        where = f"modules.{module}"
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{recipe}: {where} must be a mapping with 'models' or 'slices', got {brief(entry)}")
        extra = sorted(set(entry) - _MODULE_KEYS)
        if extra:
            raise RecipeError(f"{recipe}: {where} has unknown key(s) {', '.join(extra)}; a module takes "
                              f"{', '.join(sorted(_MODULE_KEYS))}")
        if bool(entry.get("models")) == bool(entry.get("slices")):
            raise RecipeError(f"{recipe}: {where} must give either 'models' or 'slices' (one of them, as mergekit "
                              "requires)")
        if entry.get("models"):
            if not isinstance(entry["models"], list):
                raise RecipeError(f"{recipe}: {where}.models must be a list of {{model, parameters}}")
            for i, m in enumerate(entry["models"]):
                if not isinstance(m, Mapping) or "model" not in m or set(m) - {"model", "parameters"}:
                    raise RecipeError(f"{recipe}: {where}.models[{i}] must be a mapping with 'model' (and "
                                      f"'parameters'), got {brief(m)}")
                found.append(resolve(m["model"], f"{where}.models[{i}].model"))
        else:
            for i, s in enumerate(entry["slices"] if isinstance(entry["slices"], list) else []):
                for j, src in enumerate(s.get("sources") or [] if isinstance(s, Mapping) else []):
                    if isinstance(src, Mapping) and "model" in src:
                        found.append(resolve(src["model"], f"{where}.slices[{i}].sources[{j}].model"))
    return list(dict.fromkeys(found))


def plan_modules(value: Mapping[str, Any], recipe: Path, method: str, shared: Mapping[str, Any],
                 base: Path | None, resolve: Callable[[Any, str], Path], open_model: Callable[[Path], Expert],
                 separate_base: bool, donor: Path) -> Modules:
    """The composed experts, base and per-tensor parameters of a ``modules`` recipe.

    Args:
        value: the recipe's ``modules`` (checked by :func:`referenced_models`).
        recipe: the recipe's path, for messages.
        method: the merge method.
        shared: the recipe's ``parameters``.
        base: the recipe's ``base_model``.
        resolve: resolves a model reference (``resolve(reference, where)``).
        open_model: opens a model folder (headers only).
        separate_base: whether the method takes the base apart from the models (see
            :func:`~.recipe_slices.plan_slices`).
        donor: the model whose config the output gets (the base, else the first model named).

    Raises:
        RecipeError: an architecture without modules, a module it lacks or one left out, modules merging different
            numbers of models, and what :func:`~.recipe_slices.plan_slices` refuses.
    """
    arch, specs = architecture_of(donor, recipe)
    unknown = sorted(set(value) - set(specs))
    if unknown:
        raise RecipeError(f"{recipe}: 'modules' names {', '.join(unknown)}, which {arch} does not have; its modules: "
                          f"{', '.join(specs)}")
    left = [m for m in specs if m not in value]
    if left:
        raise RecipeError(f"{recipe}: 'modules' leaves out {', '.join(left)} of {arch}: list every module (mergekit "
                          "would write only the listed ones' tensors, a model missing parts); a module kept as one "
                          "model is {models: [{model: ...}]} with merge_method passthrough, or its weight 1")
    views: dict[tuple[str, Path], Expert] = {}

    def view(module: str) -> Callable[[Path], Expert]:
        def open_view(path: Path) -> Expert:
            key = (module, path.resolve())
            if key not in views:
                expert = open_model(path)
                views[key] = expert.subset([n for n in expert.names() if module_of(n, specs) == module])
            return views[key]
        return open_view

    planned: dict[str, Sliced] = {}
    config: dict[str, Any] = {}
    for module, entry in value.items():
        where = f"modules.{module}."
        spec = specs[module]
        if entry.get("slices"):
            slices = recipe_slices.parse_slices(entry["slices"], recipe, resolve, base, key=f"modules.{module}.slices")
        else:
            slices = [_models_slice(entry["models"], recipe, resolve, base, view(module), spec.stack, where)]
        params = dict(entry.get("parameters") or {})
        for key, setting in params.items():
            mp.check_setting(setting, recipe, f"{where}parameters.{key}")
        planned[module] = recipe_slices.plan_slices(slices, recipe, method, shared, view(module), separate_base,
                                                    stack=spec.stack, module=params, where=where)
        if spec.stack.prefix is not None and spec.stack.counts:
            others = {s.stack.counts[0] for m, s in specs.items() if m != module and s.stack.counts}
            for key, count in _count_keys(donor, spec.stack.counts, planned[module].layers, others).items():
                config[key] = {**config[key], **count} if isinstance(count, dict) and key in config else count
    counts = {m: len(s.experts) for m, s in planned.items()}
    if len(set(counts.values())) > 1:
        raise RecipeError(f"{recipe}: the modules merge different numbers of models besides the base ({counts}): "
                          "lightning-merge needs the same number in every module")
    if len({s.base is None for s in planned.values()}) > 1:
        raise RecipeError(f"{recipe}: some modules have a base model and some do not; give base_model for all")
    _warn_unowned(open_model(donor), specs, arch)
    owner = {n: m for m, s in planned.items() for n in s.names}
    k = next(iter(counts.values()))
    experts: list[Expert] = [ComposedExpert({n: (planned[m].experts[i], n) for n, m in owner.items()},
                                            name=" | ".join(f"{m}: {planned[m].experts[i].name}" for m in planned))
                             for i in range(k)]
    first = next(iter(planned.values()))
    merged_base = None
    if first.base is not None:
        merged_base = ComposedExpert({n: (planned[m].base, n) for n, m in owner.items()},
                                     name=" | ".join(f"{m}: {s.base.name}" for m, s in planned.items()),
                                     path=donor if donor.is_dir() else None)
    else:
        experts[0].path = donor if donor.is_dir() else None
    return Modules(Sliced(experts, merged_base, sum(s.layers for s in planned.values()), list(owner),
                          lambda name: planned[owner[name]].values_of(name)), config)


def _models_slice(models: list[Mapping[str, Any]], recipe: Path, resolve: Callable[[Any, str], Path],
                  base: Path | None, open_view: Callable[[Path], Expert], stack: Stack, where: str) -> Slice:
    """A module's ``models`` as one slice of every model's whole stack (the base added when not listed)."""
    paths = [resolve(m["model"], f"{where}models[{i}].model") for i, m in enumerate(models)]
    params = [dict(m.get("parameters") or {}) for m in models]
    for i, p in enumerate(params):
        for key, setting in p.items():
            mp.check_setting(setting, recipe, f"{where}models[{i}].parameters.{key}")
    if base is not None and all(p.resolve() != base.resolve() for p in paths):
        paths.append(base)
        params.append({})
    sources = []
    for path, p in zip(paths, params):
        layers = recipe_slices.layout(open_view(path), path if path.is_dir() else None, where, recipe, stack).layers
        sources.append(Source(path, 0, max(layers, 1) if stack.prefix is None else layers, p))
    lengths = {s.end for s in sources}
    if len(lengths) > 1 or 0 in lengths:
        raise RecipeError(f"{recipe}: {where}models: the models' stacks have {sorted(lengths)} layers; every model "
                          "of a module must have the same number (give 'slices' to take ranges)")
    return Slice(sources, base, {})


def _count_keys(donor: Path, keys: tuple[str, ...], layers: int, others: set[str]) -> dict[str, Any]:
    """``config.json``'s keys setting a module's layer count: each of ``keys`` the donor's config holds (a nested key
    rewrites its whole sub-config), except another module's own key (T5's decoder falls back to ``num_layers``, the
    encoder's, when the config has no ``num_decoder_layers``); when none is left, the module's own key, ``keys[0]``
    (as mergekit writes it)."""
    config = model_config(donor)
    out: dict[str, Any] = {}

    def put(key: str) -> None:
        head, _, rest = key.partition(".")
        if not rest:
            out[head] = layers
        elif isinstance(config.get(head), dict):
            out[head] = {**config[head], **out.get(head, {}), rest: layers}

    for key in keys:
        head, _, rest = key.partition(".")
        held = head in config if not rest else isinstance(config.get(head), dict) and rest in config[head]
        if held and key not in others:
            put(key)
    if not out:
        put(keys[0])
    return out


def _warn_unowned(expert: Expert, specs: Mapping[str, ModuleSpec], arch: str) -> None:
    stray = [n for n in expert.names() if module_of(n, specs) is None]
    if stray:
        log.warning("%d tensor(s) of '%s' belong to no module of %s and are not in the output (as in mergekit): %s",
                    len(stray), expert.name, arch, ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else ""))


__all__ = ["ARCHITECTURE_MODULES", "ModuleSpec", "Modules", "architecture_of", "module_of", "plan_modules",
           "referenced_models"]
