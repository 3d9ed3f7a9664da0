"""mergekit's ``slices`` in a recipe: output layers made of layer ranges of the input models (layer stacking with
``passthrough``, or each output slice merging equal-length ranges of its sources), exactly as mergekit 0.1.5 plans
them (``mergekit/plan.py``) for models with one stack of layers (Llama, Mistral, Qwen and the like):

- output layers are numbered consecutively over the slices; output layer ``j`` of slice ``s`` at offset ``o`` reads
  layer ``layer_range[0] + o`` of each of the slice's sources;
- the embeddings (names with ``embed``, ``wte``, ``wpe``) come from the first slice's sources, every other tensor
  outside the layers (final norm, LM head) from the last slice's, with that slice's parameters, at ``t = 0``;
- gradients run over each slice: offset ``o`` of a slice of ``n`` layers sits at ``t = o / (n − 1)`` (1 when
  ``n = 1``); a parameter is looked up in the source's ``parameters``, then the slice's, then the recipe's;
- ``config.json``'s ``num_hidden_layers`` is the total number of output layers; the config and tokenizer come from
  ``base_model`` (else the first slice's first source).

Each output slice has the same sources in every role: the base (when the method uses one, a source of every slice)
and the same number of other sources. They become :class:`~lightning_merge.sources.composed.ComposedExpert` inputs
of an ordinary merge, whose strategy is built per tensor from its resolved parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_merge.errors import RecipeError
from lightning_merge.files.text import brief
from lightning_merge.sources.composed import ComposedExpert
from lightning_merge.sources.expert import Expert
from lightning_merge.tools import mergekit_parameters as mp
from lightning_merge.tools.architectures import model_config

#: non-layer tensors taken from the first slice's models (mergekit's "pre_weights" of Llama-style models)
EMBEDDING_MARKS = ("embed", "wte", "wpe")
_SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


@dataclass
class Source:
    """One ``slices[i].sources[j]``: a model's layers ``[start, end)`` with its parameters."""

    model: Path
    start: int
    end: int
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    """One output slice: its sources, its base (the slice's or the recipe's) and its parameters."""

    sources: list[Source]
    base: Path | None
    parameters: dict[str, Any]

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class Layout:
    """Where a model's layers are: ``prefix + index + "." + rest`` (``model.layers.`` for Llama)."""

    prefix: str
    layers: int
    rests: dict[int, list[str]]
    other: list[str]


@dataclass
class Sliced:
    """The merge a ``slices`` recipe asks for."""

    experts: list[Expert]
    base: Expert | None
    layers: int
    names: list[str]
    values_of: Callable[[str], tuple[dict[str, Any], list[dict[str, Any]]]]


def parse_slices(value: Any, recipe: Path, resolve: Callable[[Any, str], Path], base: Path | None,
                 key: str = "slices") -> list[Slice]:
    """Check the ``slices`` of a recipe (or of a module: ``key="modules.vision_tower.slices"``) and resolve its model
    paths (``resolve(reference, where)``).

    Raises:
        RecipeError: naming the key (``slices[1].sources[0].layer_range``) and what is expected.
    """
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{recipe}: '{key}' must be a non-empty list of {{sources: [...]}}")
    slices = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping) or "sources" not in entry:
            raise RecipeError(f"{recipe}: {where} must be a mapping with 'sources', got {brief(entry)}")
        extra = sorted(set(entry) - _SLICE_KEYS)
        if extra:
            raise RecipeError(f"{recipe}: {where} has unknown key(s) {', '.join(extra)}; a slice takes "
                              f"{', '.join(sorted(_SLICE_KEYS))}")
        sources = entry["sources"]
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{recipe}: {where}.sources must be a non-empty list of {{model, layer_range}}")
        params = _parameters(entry.get("parameters"), recipe, f"{where}.parameters")
        slice_base = resolve(entry["base_model"], f"{where}.base_model") if entry.get("base_model") else base
        parsed = []
        for j, source in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(source, Mapping) or "model" not in source or "layer_range" not in source:
                raise RecipeError(f"{recipe}: {at} must be a mapping with 'model' and 'layer_range', got "
                                  f"{brief(source)}")
            extra = sorted(set(source) - _SOURCE_KEYS)
            if extra:
                raise RecipeError(f"{recipe}: {at} has unknown key(s) {', '.join(extra)}")
            bounds = source["layer_range"]
            if not isinstance(bounds, list) or len(bounds) != 2 or \
                    not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) or \
                    not 0 <= bounds[0] < bounds[1]:
                raise RecipeError(f"{recipe}: {at}.layer_range must be [start, end] with 0 <= start < end (layers "
                                  f"start..end-1), got {brief(bounds)}")
            parsed.append(Source(resolve(source["model"], f"{at}.model"), bounds[0], bounds[1],
                                 _parameters(source.get("parameters"), recipe, f"{at}.parameters")))
        lengths = [s.end - s.start for s in parsed]
        if len(set(lengths)) > 1:
            raise RecipeError(f"{recipe}: {where}.sources give {lengths} layers: every source of a slice must give "
                              "the same number of layers (mergekit requires it)")
        models = [s.model.resolve() for s in parsed]
        if len(set(models)) < len(models):
            raise RecipeError(f"{recipe}: {where}.sources name one model twice: mergekit keys a slice's inputs by "
                              "model (the second would replace the first); give it once per slice")
        slices.append(Slice(parsed, slice_base, params))
    return slices


def _parameters(value: Any, recipe: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{recipe}: {where} must be a mapping of parameters, got {brief(value)}")
    for key, setting in value.items():
        mp.check_setting(setting, recipe, f"{where}.{key}")
    return dict(value)


@dataclass(frozen=True)
class Stack:
    """Where a module's layers are (mergekit's ``modules``): the prefix its layer-indexed tensors share (None: the
    module has no layers) and the ``config.json`` keys of its layer count, tried in order (dotted for nested
    configs: ``vision_config.depth``); without one, the largest index + 1."""

    prefix: str | None
    counts: tuple[str, ...] = ()


def layout(expert: Expert, folder: Path | None, where: str, recipe: Path, stack: Stack | None = None) -> Layout:
    """The layer structure of a model: the one prefix its layer-indexed tensors share, and its layer count
    (``num_hidden_layers`` of its ``config.json``, else the largest index + 1); with ``stack`` (a module of a
    model with several stacks), that stack's.

    Raises:
        RecipeError: no layer-indexed tensor, or several prefixes (several stacks: a vision tower, an encoder).
    """
    if stack is not None:
        return _stack_layout(expert, folder, stack)
    prefixes: dict[str, int] = {}
    rests: dict[int, list[str]] = {}
    other = []
    for name in expert.names():
        parts = name.split(".")
        k = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if k is None or k == len(parts) - 1:
            other.append(name)
            continue
        prefix = ".".join(parts[:k]) + "." if k else ""
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
        rests.setdefault(int(parts[k]), []).append(".".join(parts[k + 1:]))
    if not prefixes:
        raise RecipeError(f"{recipe}: {where}: '{expert.name}' has no tensor with a layer index (such as "
                          "model.layers.0.mlp.up_proj.weight): 'slices' cannot find its layers")
    if len(prefixes) > 1:
        raise RecipeError(f"{recipe}: {where}: '{expert.name}' has layers under several prefixes "
                          f"({', '.join(sorted(prefixes))}): a model with several stacks of layers is sliced with "
                          "mergekit's 'modules' (one stack per module), for the architectures that define them")
    layers = max(rests) + 1
    config = mp.count_layers(folder, []) if folder is not None else None
    return Layout(next(iter(prefixes)), config or layers, rests, other)


def _stack_layout(expert: Expert, folder: Path | None, stack: Stack) -> Layout:
    rests: dict[int, list[str]] = {}
    other = []
    for name in expert.names():
        rest = name[len(stack.prefix):] if stack.prefix and name.startswith(stack.prefix) else None
        index, _, tail = (rest or "").partition(".")
        if rest is None or not index.isdigit() or not tail:
            other.append(name)
        else:
            rests.setdefault(int(index), []).append(tail)
    counted = _config_count(folder, stack.counts) if folder is not None else None
    return Layout(stack.prefix or "", counted or (max(rests) + 1 if rests else 0), rests, other)


def _config_count(folder: Path, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` (dotted: nested) that ``folder/config.json`` holds as a positive integer."""
    config = model_config(folder)
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def plan_slices(slices: list[Slice], recipe: Path, method: str, shared: Mapping[str, Any],
                open_model: Callable[[Path], Expert], separate_base: bool,
                vocabulary: tuple[frozenset[str], Callable[[int, Expert], Expert]] | None = None,
                stack: Stack | None = None, module: Mapping[str, Any] | None = None, where: str = "") -> Sliced:
    """The composed experts, base and per-tensor parameters of a ``slices`` recipe.

    Args:
        slices: the parsed slices.
        recipe: the recipe's path, for messages.
        method: the merge method (``passthrough`` takes one source per slice).
        shared: the recipe's ``parameters``.
        open_model: opens a model folder (headers only).
        separate_base: whether the method takes the base apart from the models (task vectors): then the base is a
            source of every slice, and the others are the experts.
        vocabulary: with tokenizer merging, the token-indexed tensors' names and ``view(s, model)``: the model as
            slice ``s``'s models are aligned to the output vocabulary (mergekit aligns the embeddings among the first
            slice's sources, the LM head among the last's).
        stack: for one module of ``modules``: where its layers are (``open_model`` then gives each model's view of
            that module's tensors).
        module: that module's ``parameters`` (between the slice's and the recipe's).
        where: the key holding ``slices`` in messages (``"modules.vision_tower."``).

    Raises:
        RecipeError: a slice without its base among its sources, slices with different numbers of experts, a layer
            range beyond a model's layers, or a tensor a source lacks.
    """
    opened: dict[Path, tuple[Expert, Layout]] = {}

    def model(path: Path, where: str) -> tuple[Expert, Layout]:
        key = path.resolve()
        if key not in opened:
            expert = open_model(path)
            opened[key] = (expert, layout(expert, path if path.is_dir() else None, where, recipe, stack))
        return opened[key]

    roles: list[tuple[Source | None, list[Source]]] = []  # per slice: (base source, expert sources)
    for i, s in enumerate(slices):
        at = f"{recipe}: {where}slices[{i}]"
        base_source = None
        if separate_base and s.base is not None:
            base_source = next((src for src in s.sources if src.model.resolve() == s.base.resolve()), None)
            if base_source is None:
                raise RecipeError(f"{at}: its base model '{s.base}' is not among its sources; a "
                                  f"slice merged with '{method}' reads the base's layers from its sources: add "
                                  f"{{model: {s.base}, layer_range: [...]}} to {where}slices[{i}].sources")
        others = [src for src in s.sources if src is not base_source]
        if method == "passthrough" and len(s.sources) != 1:
            raise RecipeError(f"{at}.sources has {len(s.sources)} models: passthrough takes one "
                              "source per slice (stack the layers with one slice per range)")
        if not others:
            raise RecipeError(f"{at}.sources holds only the base model: nothing to merge into it")
        roles.append((base_source, others))
        for j, src in enumerate(s.sources):
            _, lay = model(src.model, f"{where}slices[{i}].sources[{j}]")
            if src.end > lay.layers and (stack is None or stack.prefix is not None):  # (a module without layers:
                # its tensors whatever the range)
                raise RecipeError(f"{at}.sources[{j}].layer_range [{src.start}, {src.end}] goes "
                                  f"beyond '{src.model}', which has {lay.layers} layers (0..{lay.layers - 1})")
    counts = {len(others) for _, others in roles}
    if len(counts) > 1:
        raise RecipeError(f"{recipe}: the slices merge {[len(o) for _, o in roles]} models besides the base: "
                          "lightning-merge needs the same number in every slice")
    k = counts.pop()
    with_base = roles[0][0] is not None
    if any((b is not None) != with_base for b, _ in roles):
        raise RecipeError(f"{recipe}: some slices have a base model and some do not; give base_model for all")

    tables: list[dict[str, tuple[Expert, str]]] = [{} for _ in range(k)]
    base_table: dict[str, tuple[Expert, str]] = {}
    scope: dict[str, tuple[int, float]] = {}  # output name -> (slice index, t)
    first_expert, first_layout = model(slices[0].sources[0].model, f"{where}slices[0].sources[0]")
    prefix = first_layout.prefix

    def holder(src: Source, name: str, s: int) -> tuple[Expert, str]:
        expert, name = _holder(model(src.model, "")[0], name, recipe, f"{where}slices[{s}]",
                               slices[s].sources.index(src))
        if vocabulary is not None and name in vocabulary[0]:
            expert = vocabulary[1](s, expert)
        return expert, name

    def add(out: str, s: int, t: float, reads: Callable[[Source], str]) -> None:
        base_source, others = roles[s]
        for table, src in zip(tables, others):
            table[out] = holder(src, reads(src), s)
        if base_source is not None:
            base_table[out] = holder(base_source, reads(base_source), s)
        scope[out] = (s, t)

    def prefix_of(src: Source) -> str:
        return model(src.model, "")[1].prefix

    embeddings = [n for n in first_layout.other if any(m in n for m in EMBEDDING_MARKS)]
    last_layout = model(slices[-1].sources[0].model, "")[1]
    rest = [n for n in last_layout.other if not any(m in n for m in EMBEDDING_MARKS)]
    for name in embeddings:
        add(name, 0, 0.0, lambda src, name=name: name)
    j = 0
    for s, sl in enumerate(slices):
        lead = sl.sources[0]
        lead_layout = model(lead.model, "")[1]
        n = sl.length
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            for tail in lead_layout.rests.get(lead.start + offset, []):
                add(f"{prefix}{j}.{tail}", s, t,
                    lambda src, tail=tail, offset=offset: f"{prefix_of(src)}{src.start + offset}.{tail}")
            j += 1
    for name in rest:
        add(name, len(slices) - 1, 0.0, lambda src, name=name: name)

    donor = slices[0].base or slices[0].sources[0].model
    label = [" + ".join(f"{str(o[i].model)}[{o[i].start}:{o[i].end}]" for _, o in roles) for i in range(k)]
    experts: list[Expert] = [ComposedExpert(table, name=f"slices: {label[i]}") for i, table in enumerate(tables)]
    base = None
    if with_base:
        names = " + ".join(f"{str(b.model)}[{b.start}:{b.end}]" for b, _ in roles if b is not None)
        base = ComposedExpert(base_table, name=f"slices base: {names}", path=donor if donor.is_dir() else None)
    else:
        experts[0].path = donor if donor.is_dir() else None

    def values_of(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        s, t = scope[name]
        _, others = roles[s]
        plain_shared, plain_models = mp.resolve({**shared}, [src.parameters for src in others], name, t)
        module_shared, _ = mp.resolve(module or {}, [], name, t)
        slice_shared, _ = mp.resolve(slices[s].parameters, [], name, t)
        return {**plain_shared, **module_shared, **slice_shared}, plain_models

    return Sliced(experts, base, j, list(scope), values_of)


def _holder(expert: Expert, name: str, recipe: Path, where: str, j: int) -> tuple[Expert, str]:
    if name not in expert:
        raise RecipeError(f"{recipe}: {where}.sources[{j}]: '{expert.name}' has no tensor '{name}' (the output "
                          "needs it from every source of the slice)")
    return expert, name


def output_config(donor: Path, layers: int) -> dict[str, Any] | None:
    """``config.json``'s keys a sliced merge sets (its layer count), when the donor folder has a config."""
    config = donor / "config.json" if donor.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        found = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return {"num_hidden_layers": layers} if isinstance(found, dict) else None


__all__ = ["Layout", "Slice", "Sliced", "Source", "Stack", "layout", "output_config", "parse_slices", "plan_slices"]
