"""mergekit-format recipes: read a YAML file, check everything (methods, parameters, files, architectures)
before any tensor is merged, and build the experts and the strategy with mergekit's semantics."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_merge.engine.card import RECIPE_NAME, merged_keys
from lightning_merge.engine.run import parse_dtype
from lightning_merge.errors import RecipeError
from lightning_merge.files.remote import is_url, redact
from lightning_merge.files.text import brief
from lightning_merge.formats.lora import adapter_base_path
from lightning_merge.formats.sidecar import fetch_with_sidecar
from lightning_merge.sources.expert import Expert
from lightning_merge.strategies import (
    RAM,
    SCE,
    STRATEGIES,
    Breadcrumbs,
    Dare,
    Della,
    Linear,
    PerTensor,
    RAMPlusTL,
    Strategy,
    TaskArithmetic,
    Ties,
)
from lightning_merge.tools import mergekit_parameters as mp
from lightning_merge.tools import recipe_modules, recipe_slices
from lightning_merge.tools.architectures import untied_config, with_tied_tensors
from lightning_merge.tools.chat_templates import chat_template_files, resolve_template
from lightning_merge.tools.recipe_expansion import check_expansion
from lightning_merge.tools.recipe_methods import GEOMETRIC, INCLUDES_BASE, geometric_arguments
from lightning_merge.tools.tokenizer_merge import align_vocabularies, output_vocabulary, parse_tokenizer

log = logging.getLogger("lightning_merge")

# mergekit method → (class, fixed arguments, default normalize, per-model parameters, shared parameters)
_MERGEKIT: dict[str, tuple[type[Strategy], dict[str, Any], bool | None, tuple[str, ...], tuple[str, ...]]] = {
    "linear": (Linear, {}, True, ("weight",), ("normalize",)),
    "task_arithmetic": (TaskArithmetic, {}, False, ("weight",), ("normalize", "lambda", "rescale", "int8_mask")),
    "ties": (Ties, {"election": "weighted", "topk": "tensor"}, True, ("weight", "density"),
             ("normalize", "lambda", "rescale", "int8_mask")),
    "dare_linear": (Dare, {"combine": "linear"}, False, ("weight", "density"),
                    ("normalize", "lambda", "rescale", "int8_mask")),
    "dare_ties": (Dare, {"combine": "ties", "election": "weighted"}, False, ("weight", "density"),
                  ("normalize", "lambda", "rescale", "int8_mask")),
    "breadcrumbs": (Breadcrumbs, {}, False, ("weight", "density", "gamma"),
                    ("normalize", "lambda", "rescale", "int8_mask")),
    "breadcrumbs_ties": (Breadcrumbs, {"election": "weighted"}, False, ("weight", "density", "gamma"),
                         ("normalize", "lambda", "rescale", "int8_mask")),
    **GEOMETRIC,  # slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion (recipe_methods.py)
    "della": (Della, {"combine": "ties"}, True, ("weight", "density", "epsilon"),
              ("normalize", "lambda", "rescale", "int8_mask")),
    "della_linear": (Della, {"combine": "linear"}, False, ("weight", "density", "epsilon"),
                     ("normalize", "lambda", "rescale", "int8_mask")),
    "sce": (SCE, {}, None, (), ("select_topk", "int8_mask")),
    "ram": (RAM, {}, None, (), ("epsilon",)),
    "ramplus_tl": (RAMPlusTL, {}, None, (), ("r", "alpha", "epsilon")),
    "passthrough": (Linear, {"normalize": False}, None, ("scale",), ()),  # one input, times its scale (or 1)
}
# Parameters mergekit knows for some method: given to a method that does not use them, mergekit ignores them (and
# published recipes rely on it), so they are ignored here with a warning; a name no method knows is an error.
_MERGEKIT_PARAMETERS = {"weight", "density", "normalize", "lambda", "rescale", "int8_mask", "gamma", "epsilon", "k",
                        "select_topk", "t", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "lambda_",
                        "normalize_weights", "max_iter", "tol", "r", "alpha", "scale"}
# This project's arguments accepted with a mergekit method name (they extend mergekit's method).
_EXTENSIONS = {"ties": ("topk", "election", "weighting"), "task_arithmetic": ("election", "weighting"),
               "dare_linear": ("weighting", "seed"), "dare_ties": ("weighting", "seed", "election"),
               "breadcrumbs": ("weighting", "election"), "breadcrumbs_ties": ("weighting", "election"),
               "della": ("weighting", "seed", "election"), "della_linear": ("weighting", "seed")}
_TOP_LEVEL = {"merge_method", "strategy", "base_model", "models", "slices", "modules", "parameters", "dtype",
              "out_dtype", "name", "chat_template", "tokenizer_source", "tokenizer"}
_REFUSED: dict[str, str] = {}  # mergekit keys not implemented: none


@dataclass
class Recipe:
    """A checked recipe: experts opened (headers read), base, strategy and output dtype, and the files a folder
    output gets besides the weights (``merge(files=...)``: the recipe itself, a sliced model's layer count, a chat
    template)."""

    path: Path
    experts: list[Expert]
    base: Expert | None
    strategy: Strategy
    dtype: Any
    files: dict[str, Any] = field(default_factory=dict)
    tokenizer: bool = False  # tokenizer merging: the token-indexed rows follow the tokenizer in ``files``


def _existing(ref: str, recipe: Path, where: str, urls: dict[Path, str]) -> Path:
    if is_url(ref):  # object storage: the local copy (fetched once, with its sidecar); named by its URL
        try:
            local = fetch_with_sidecar(ref)
        except FileNotFoundError:
            raise RecipeError(f"{recipe}: {where} '{redact(ref)}' not found (nothing exists at that URL)") from None
        urls[local] = ref
        return local
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute():
        path = recipe.parent / path
    if not path.exists():
        raise RecipeError(
            f"{recipe}: {where} '{ref}' not found (looked for '{path}'); paths are relative to the recipe, and hub "
            f"model ids are not downloaded: download the model first and give its folder"
        )
    return path


def _resolve_model(ref: Any, recipe: Path, where: str, urls: dict[Path, str]) -> tuple[Path, Path | None]:
    """``(model path, LoRA adapter path or None)`` of a mergekit model reference: a path, ``{path: ...}``,
    ``{model: {path: ...}, lora: {path: ...}}``, or the ``"model+lora"`` shorthand."""
    lora: Any = None
    if isinstance(ref, Mapping):
        if "path" in ref and len(ref) == 1:
            ref = ref["path"]
        elif "model" in ref and isinstance(ref["model"], Mapping) and set(ref["model"]) == {"path"} and \
                set(ref) <= {"model", "lora"}:
            lora = ref.get("lora")
            if isinstance(lora, Mapping):
                lora = lora.get("path")
            ref = ref["model"]["path"]
        else:
            raise RecipeError(f"{recipe}: {where} must be a path, got {brief(ref)}")
    if not isinstance(ref, str):
        raise RecipeError(f"{recipe}: {where} must be a path string, got {brief(ref)}")
    if lora is None and "+" in ref and not is_url(ref) and not (recipe.parent / ref).exists() and \
            not Path(ref).exists():
        ref, lora = ref.split("+", 1)
    path = _existing(ref, recipe, where, urls)
    if lora is None:
        return path, None
    if not isinstance(lora, str):
        raise RecipeError(f"{recipe}: {where}'s lora must be a path, got {brief(lora)}")
    adapter = _existing(lora, recipe, f"{where} (its LoRA)", urls)
    if not _is_adapter(adapter):
        raise RecipeError(f"{recipe}: {where}'s LoRA '{lora}' is not a PEFT adapter folder (no adapter_config.json)")
    return path, adapter


def _check_scalar(value: Any, recipe: Path, where: str) -> None:
    if isinstance(value, (list, Mapping)):
        raise RecipeError(
            f"{recipe}: {where} is a list or a mapping: per-layer gradients and 'filter' values are not supported; "
            f"give one number"
        )


def load_recipe(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                trust_checkpoint: bool = False) -> Recipe:
    """Read and check a recipe; open every model's header. Reads no tensor data.

    Args:
        path: the YAML recipe (mergekit's format, or one of this project's methods with its arguments).
        overrides: ``--set key=value`` pairs applied to the strategy's arguments.
        trust_checkpoint: allow unpickling ``.ckpt`` files (only for files you trust).

    Raises:
        RecipeError: unknown method or parameter, unsupported mergekit feature, missing file.
    """
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe '{path}' does not exist") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {err}") from err
    except RecursionError:
        raise RecipeError(f"recipe '{path}' nests lists or mappings too deeply to be read; a recipe needs a few "
                          "levels") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe '{path}' is not UTF-8 text ({err.reason} at byte {err.start}): is it a model file "
                          "rather than the YAML recipe?") from None
    if not isinstance(config, Mapping):
        raise RecipeError(f"recipe '{path}' must be a mapping with merge_method and models")
    check_expansion(config, f"{path}: the recipe")
    if overrides:
        check_expansion(dict(overrides), f"{path}: --set")
    for key, what in _REFUSED.items():
        if key in config:
            raise RecipeError(f"{path}: '{key}' ({what}) is a mergekit feature lightning-merge does not implement")
    unknown = sorted(set(config) - _TOP_LEVEL)
    if unknown:
        raise RecipeError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected {', '.join(sorted(_TOP_LEVEL))}"
        )
    if config.get("chat_template") not in (None, "auto"):
        resolve_template(config["chat_template"], path, [])  # a bad template is refused before anything is read
    method = config.get("merge_method")
    exact = config.get("strategy")
    if exact is not None:
        if method is not None or config.get("parameters"):
            raise RecipeError(
                f"{path}: give either 'strategy' (this project's strategy as Strategy.to_dict() writes it) or "
                "'merge_method' with 'parameters' (mergekit's form), not both"
            )
        if not isinstance(exact, Mapping):
            raise RecipeError(f"{path}: 'strategy' must be a mapping such as {{name: ties, density: 0.2}}")
        method = exact.get("name", exact.get("class_path"))
    if method is None:
        raise RecipeError(f"{path}: 'merge_method' is missing")
    if exact is None and method not in _MERGEKIT and method not in STRATEGIES:
        known = sorted(set(_MERGEKIT) | set(STRATEGIES))
        raise RecipeError(f"{path}: merge_method {brief(method)} is not supported; supported: {', '.join(known)}")

    base_path = None
    urls: dict[Path, str] = {}  # local copies of models given as URLs -> the URL (their display name)
    if config.get("base_model"):
        base_path, base_lora = _resolve_model(config["base_model"], path, "base_model", urls)
        if base_lora is not None:
            raise RecipeError(f"{path}: base_model with a LoRA is not supported: merge the adapter into it first")
    shared = dict(config.get("parameters") or {})
    if method in _MERGEKIT:  # this project's methods take lists (order) and mappings (LiNeS' inner) as they are
        for key, value in shared.items():
            mp.check_setting(value, path, f"parameters.{key}")
    dtype = config.get("out_dtype") or config.get("dtype")
    try:
        dtype = parse_dtype(dtype, "dtype")
    except ValueError as err:
        raise RecipeError(f"{path}: {err}") from None

    def open_model(local: Path, **kwargs: Any) -> Expert:
        expert = Expert(local, trust_checkpoint=trust_checkpoint, name=redact(urls.get(local, str(local))), **kwargs)
        expert.url = urls.get(local)  # named by its URL (redacted); the merge's output must not be that URL
        return expert

    files: dict[str, Any] = {RECIPE_NAME: redact(path.read_text())}  # never a URL's credentials in the output

    def resolve_tokenizer_model(ref: Any, where: str) -> Path:
        local, lora = _resolve_model(ref, path, where, urls)
        if lora is not None:
            raise RecipeError(f"{path}: {where}: give the model's folder (its tokenizer), not a LoRA")
        return local

    tokenizer = parse_tokenizer(config, path, resolve_tokenizer_model)
    separate = method not in ("linear", "passthrough") and method not in INCLUDES_BASE

    def resolve(ref: Any, where: str) -> Path:  # a model of slices or modules
        local, lora = _resolve_model(ref, path, where, urls)
        if lora is not None:
            raise RecipeError(f"{path}: {where}: a LoRA in a slice or module is not supported; merge the adapter into "
                              "its model first")
        return local

    def open_all(paths: list[Path]) -> Callable[[Path], Expert]:
        """Open each model once, read with the names tied to its tensors (:func:`with_tied_tensors`)."""
        opened: dict[Path, Expert] = {}
        for local in paths:
            if local.resolve() not in opened:
                opened[local.resolve()] = open_model(local)
        opened = dict(zip(opened, with_tied_tensors([(e, p) for p, e in opened.items()], path)))
        return lambda local: opened[local.resolve()]

    for key in ("modules", "slices"):
        if key in config and exact is None and method not in _MERGEKIT:
            raise RecipeError(f"{path}: '{key}' merges with one of mergekit's methods; '{method}' is this project's "
                              f"(its inputs are composed from the models' tensors, without their statistics or "
                              f"adapters): use 'models', or a mergekit merge_method")
    if "modules" in config:
        if config.get("models") or config.get("slices") or exact is not None or method not in _MERGEKIT:
            raise RecipeError(f"{path}: 'modules' takes a mergekit merge_method and no 'models' or 'slices' (exactly "
                              "one of the three, as mergekit requires)")
        if tokenizer is not None:
            raise RecipeError(f"{path}: tokenizer merging (tokenizer_source / tokenizer) with 'modules' is not "
                              "implemented: merge the models with one tokenizer, or without 'modules'")
        every = ([base_path] if base_path else []) + recipe_modules.referenced_models(config["modules"], path, resolve)
        open_once = open_all(every)
        donor = every[0]
        planned = recipe_modules.plan_modules(config["modules"], path, method, shared, base_path, resolve, open_once,
                                              separate, donor)
        strategy = _build_per_tensor(method, overrides or {}, path, planned.sliced.names, planned.sliced.values_of)
        if strategy.needs_base and planned.sliced.base is None:
            raise RecipeError(f"{path}: merge_method '{method}' needs base_model")
        keys = merged_keys(planned.config, untied_config(open_once(donor)))
        if keys:
            files["config.json"] = keys
        files.update(chat_template_files(config.get("chat_template"), path, donor, every))
        return Recipe(path, planned.sliced.experts, planned.sliced.base, strategy, dtype, files)
    if "slices" in config:
        if config.get("models") or exact is not None or method not in _MERGEKIT:
            raise RecipeError(f"{path}: 'slices' takes a mergekit merge_method and no 'models' (give either "
                              "'models' or 'slices', as mergekit requires)")
        slices = recipe_slices.parse_slices(config["slices"], path, resolve, base_path)
        open_once = open_all([m for sl in slices for m in [sl.base, *(src.model for src in sl.sources)] if m])

        vocabulary = None
        donor = slices[0].base or slices[0].sources[0].model
        if tokenizer is not None:  # the output's tokenizer over every model; each slice's models aligned to it
            every: list[Path] = []
            named = [donor] + [m for sl in slices for m in [src.model for src in sl.sources] + [sl.base] if m]
            for m in named:
                if all(m.resolve() != e.resolve() for e in every):  # each model once, in the recipe's order
                    every.append(m)
            template = config.get("chat_template")
            text = None if template is None else resolve_template(template, path, every)
            output = output_vocabulary(tokenizer, [(open_once(m), m) for m in every], path, text)
            views: dict[int, Callable[[Expert], Expert]] = {}

            def view(s: int, expert: Expert) -> Expert:
                if s not in views:
                    sl = slices[s]
                    views[s] = output.aligner([open_once(src.model) for src in sl.sources],
                                              open_once(sl.base) if sl.base else None, f"slices[{s}]'s models")
                return views[s](expert)

            vocabulary = (output.names, view)
        sliced = recipe_slices.plan_slices(slices, path, method, shared, open_once, separate, vocabulary)
        strategy = _build_per_tensor(method, overrides or {}, path, sliced.names, sliced.values_of)
        if strategy.needs_base and sliced.base is None:
            raise RecipeError(f"{path}: merge_method '{method}' needs base_model")
        layers = merged_keys(recipe_slices.output_config(donor, sliced.layers) or {}, untied_config(open_once(donor)))
        if layers:
            files["config.json"] = layers
        if vocabulary is not None:
            tokenizer_files = dict(output.files)
            config_keys = merged_keys(files.get("config.json") or {}, tokenizer_files.pop("config.json", {}))
            files.update(tokenizer_files)
            if config_keys:
                files["config.json"] = config_keys
        else:
            files.update(chat_template_files(config.get("chat_template"), path, donor,
                                             [src.model for sl in slices for src in sl.sources]))
        return Recipe(path, sliced.experts, sliced.base, strategy, dtype, files, tokenizer=vocabulary is not None)

    models = config.get("models") or []
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{path}: 'models' must be a non-empty list")
    entries: list[tuple[Path, dict[str, Any]]] = []
    adapter_bases: dict[Path, Path] = {}
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise RecipeError(f"{path}: models[{i}] must be a mapping with a 'model' key")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"{path}: models[{i}] has unknown key(s) {', '.join(extra)}")
        model_path, lora_path = _resolve_model(entry["model"], path, f"models[{i}].model", urls)
        if lora_path is not None:  # mergekit's model+lora: the adapter, over that model
            adapter_bases[lora_path] = model_path
            model_path = lora_path
        params = dict(entry.get("parameters") or {})
        for key, value in params.items():
            if method in _MERGEKIT and exact is None:
                mp.check_setting(value, path, f"models[{i}].parameters.{key}")
            else:
                _check_scalar(value, path, f"models[{i}].parameters.{key}")
        if base_path is not None and model_path.resolve() == base_path.resolve() and method != "linear" and \
                method not in INCLUDES_BASE and exact is None:
            continue  # mergekit lists the base among the models; it is not a task vector
        entries.append((model_path, params))
    if method in INCLUDES_BASE and exact is None and base_path is not None and \
            all(p.resolve() != base_path.resolve() for p, _ in entries):
        entries.append((base_path, {}))  # mergekit adds the base to the models it averages
    if not entries:
        raise RecipeError(f"{path}: no model to merge besides the base")
    if method == "passthrough" and exact is None and (len(entries) != 1 or base_path is not None):
        raise RecipeError(f"{path}: passthrough takes exactly one model and no base_model (mergekit's passthrough "
                          "has one input); to stack layers of several models, use 'slices'")

    if exact is not None:
        per_model = [i for i, (_, params) in enumerate(entries) if params]
        if per_model:
            raise RecipeError(
                f"{path}: models[{per_model[0]}] has parameters, but with 'strategy' every argument is the strategy's "
                "(per-expert values as lists in it, in the order of models)"
            )
        try:
            strategy = Strategy.from_dict({**exact, **(overrides or {})})
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{path}: strategy: {err}") from None
    elif method in _MERGEKIT and any(mp.varies(v) for p in [shared, *(p for _, p in entries)] for v in p.values()):
        strategy = None  # per-layer gradients or filters: built per tensor once the models' headers are open
    else:
        strategy = _build_strategy(method, shared, [p for _, p in entries], overrides or {}, path)
    if strategy is not None and strategy.needs_base and base_path is None:
        base_path = _adapters_base(entries, adapter_bases)
        if base_path is None:
            raise RecipeError(f"{path}: merge_method '{method}' needs base_model (models that are all adapters take "
                              "the base they name, when it is a local folder and the same for each)")
    try:
        if strategy is not None:  # a per-tensor strategy checks each of its strategies when it is built
            strategy.check_num_experts(len(entries))
    except ValueError as err:
        raise RecipeError(f"{path}: {err}") from None
    base = open_model(base_path) if base_path is not None else None
    experts = []
    for p, _ in entries:
        adapter_base: Any = None
        if _is_adapter(p):
            named = adapter_bases.get(p)
            adapter_base = base if named is None or (base_path and named.resolve() == base_path.resolve()) else named
        experts.append(open_model(p, base=adapter_base))
    opened = with_tied_tensors(([(base, base_path)] if base is not None else []) + [(e, p) for e, (p, _) in
                                                                                   zip(experts, entries)], path)
    base, experts = (opened[0], opened[1:]) if base is not None else (None, opened)
    untie = untied_config(base if base is not None else experts[0])
    if strategy is None:
        names = sorted({n for e in ([base] if base is not None else experts) for n in e.names()})
        layers = mp.count_layers(base_path if base_path is not None else entries[0][0], names)
        per_model = [p for _, p in entries]
        strategy = _build_per_tensor(method, overrides or {}, path, names,
                                     lambda name: mp.resolve(shared, per_model, name, mp.layer_position(name, layers)))
        if strategy.needs_base and base_path is None:
            raise RecipeError(f"{path}: merge_method '{method}' needs base_model")
    donor = base_path if base_path is not None else entries[0][0]
    if tokenizer is not None:  # the output's tokenizer is built, and carries the chat template
        template = config.get("chat_template")
        # a LoRA's tokenizer is its model's: the one named (model+lora), else the base it is applied to
        model_folders = [adapter_bases.get(p, base_path if _is_adapter(p) and base_path is not None else p)
                         for p, _ in entries]
        text = None if template is None else \
            resolve_template(template, path, list(dict.fromkeys([donor, *model_folders])))
        aligned = align_vocabularies(tokenizer, None if base is None else (base, base_path),
                                     list(zip(experts, model_folders)), path, text)
        files.update(aligned.files)
        files["config.json"] = merged_keys(files.get("config.json", {}), untie)
        return Recipe(path, aligned.experts, aligned.base, strategy, dtype, files, tokenizer=True)
    files.update(chat_template_files(config.get("chat_template"), path, donor, [p for p, _ in entries]))
    if untie:
        files["config.json"] = untie
    return Recipe(path, experts, base, strategy, dtype, files)


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").exists()


def _adapters_base(entries: list[tuple[Path, dict[str, Any]]], adapter_bases: Mapping[Path, Path]) -> Path | None:
    """The base of a recipe whose models are all adapters: the one each names (model+lora's model, else the local
    ``base_model_name_or_path`` of its adapter_config.json) when they all name the same folder; else None."""
    if not entries or not all(_is_adapter(p) for p, _ in entries):
        return None
    named = [adapter_bases.get(p) or adapter_base_path(p) for p, _ in entries]
    if any(b is None or not b.is_dir() for b in named) or len({b.resolve() for b in named}) != 1:
        return None
    return named[0]


def _build_per_tensor(method: str, overrides: Mapping[str, Any], recipe: Path, names: list[str],
                      values_of: Callable[[str], tuple[dict[str, Any], list[dict[str, Any]]]]) -> Strategy:
    """The strategy of a recipe whose parameters vary by layer or by tensor name: each tensor's parameters resolved
    as mergekit resolves them (``values_of(name)``: the shared and the per-model values, see
    :mod:`lightning_merge.tools.mergekit_parameters`), its strategy built by the same code as for plain values; one
    strategy when they all agree, else a :class:`PerTensor` table."""
    built: dict[str, Strategy] = {}  # the resolved values (repr) -> strategy
    table: dict[str, Strategy] = {}
    for name in names:
        values = values_of(name)
        key = repr(values)
        if key not in built:
            was = log.disabled
            log.disabled = was or bool(built)  # the warnings for ignored parameters once, not once per layer
            try:
                built[key] = _build_strategy(method, values[0], values[1], overrides, recipe)
            except RecipeError as err:
                raise RecipeError(f"{err} (at tensor '{name}', whose parameters the recipe's gradients and filters "
                                  f"give as {brief(values[0])}, {brief(values[1])})") from None
            finally:
                log.disabled = was
        table[name] = built[key]
    distinct: list[Strategy] = []
    for s in table.values():
        if s not in distinct:
            distinct.append(s)
    if len(distinct) == 1:
        return distinct[0]
    try:
        return PerTensor(strategies=distinct, tensors={n: distinct.index(s) for n, s in table.items()})
    except ValueError as err:
        raise RecipeError(f"{recipe}: {err}") from None


def _build_strategy(method: str, shared: dict[str, Any], per_model: list[dict[str, Any]],
                    overrides: Mapping[str, Any], recipe: Path) -> Strategy:
    if method in _MERGEKIT:
        cls, fixed, default_normalize, model_params, shared_params = _MERGEKIT[method]
        extensions = set(_EXTENSIONS.get(method, ()))
        allowed_shared = set(shared_params) | set(model_params) | extensions
        shared = {k: v for k, v in shared.items() if _accepted(k, allowed_shared, method, "parameters", recipe)}
        per_model = [
            {k: v for k, v in params.items() if _accepted(k, set(model_params), method, f"models[{i}].parameters",
                                                          recipe)}
            for i, params in enumerate(per_model)
        ]

        def per_expert(key: str, default: float | None) -> list[float]:
            values = []
            for i, params in enumerate(per_model):
                where = f"models[{i}].parameters.{key}" if key in params else f"parameters.{key}"
                value = params.get(key, shared.get(key, default))
                if value is None:
                    raise RecipeError(f"{recipe}: models[{i}] has no '{key}' (mergekit requires it for '{method}')")
                values.append(_number(value, recipe, where))
            return values

        if method == "passthrough":
            return _from_spec({"name": "linear", "normalize": False, "weights": per_expert("scale", 1.0),
                               **overrides}, recipe)
        if method in GEOMETRIC:
            arguments = geometric_arguments(method, shared, per_expert, recipe)
            return _from_spec({"name": cls.name, **arguments, **overrides}, recipe)
        kwargs: dict[str, Any] = dict(fixed)
        if "weight" in model_params:
            kwargs["weights"] = per_expert("weight", None)
        if "normalize" in shared_params:
            kwargs["normalize"] = _boolean(shared.get("normalize", default_normalize), recipe, "parameters.normalize")
        if "lambda" in shared_params:
            kwargs["scale"] = _number(shared.get("lambda", 1.0), recipe, "parameters.lambda")
        if "rescale" in shared_params:
            rescale = _boolean(shared.get("rescale", cls is Dare or cls is Della), recipe, "parameters.rescale")
            kwargs["rescale"] = "l1" if rescale else "none"
        for key in set(shared_params) - {"normalize", "lambda", "rescale", "int8_mask"}:  # plain numbers (sce, ram)
            if key in shared:
                kwargs[key] = _number(shared[key], recipe, f"parameters.{key}")
        for key in extensions:
            if key in shared:
                kwargs[key] = shared[key]
        if cls is Ties or cls is Breadcrumbs or cls is Della:
            kwargs["density"] = per_expert("density", 1.0)
        if cls is Breadcrumbs:
            kwargs["gamma"] = per_expert("gamma", 0.01)
        if cls is Della:
            kwargs["epsilon"] = per_expert("epsilon", 0.15)
        if cls is Dare:
            kwargs["drop_rate"] = [1.0 - d for d in per_expert("density", 1.0)]
        spec = {"name": cls.name, **kwargs, **overrides}
    else:
        spec = {"name": method, **shared, **overrides}
        weights = [p.pop("weight", None) for p in per_model]
        if any(w is not None for w in weights):
            spec["weights"] = [1.0 if w is None else _number(w, recipe, f"models[{i}].parameters.weight")
                               for i, w in enumerate(weights)]
        for i, params in enumerate(per_model):
            if params:
                raise RecipeError(f"{recipe}: models[{i}].parameters {', '.join(params)}: only 'weight' is per model "
                                  f"for '{method}'; put other parameters under 'parameters'")
    return _from_spec(spec, recipe)


def _from_spec(spec: dict[str, Any], recipe: Path) -> Strategy:
    try:
        return Strategy.from_dict(spec)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{recipe}: {err}") from None


def _accepted(key: str, allowed: set[str], method: str, where: str, recipe: Path) -> bool:
    """Whether a mergekit parameter is used; mergekit's own parameters that this method ignores are dropped with a
    warning (as mergekit ignores them), unknown names are errors."""
    if key in allowed:
        return True
    if key in _MERGEKIT_PARAMETERS:
        log.warning("%s: %s.%s is ignored by '%s' (as mergekit ignores it)", recipe, where, key, method)
        return False
    raise RecipeError(f"{recipe}: {where}.{key} is not a parameter of '{method}'; it takes: "
                      f"{', '.join(sorted(allowed))}")


def _number(value: Any, recipe: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{recipe}: {where} must be a number, got {brief(value)}")
    return float(value)


def _boolean(value: Any, recipe: Path, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RecipeError(f"{recipe}: {where} must be true or false, got {brief(value)}")
