"""RegMean++ (Nguyen et al., 2025): RegMean whose input Gram matrices are read on the *merged* model, layer by layer.

RegMean merges each linear layer to match every expert's outputs on that expert's own inputs Xᵢ: the inputs its
own earlier layers produce. RegMean++ takes the inputs from the model being merged instead: the Gram matrices of
layer l are computed with every layer before l already merged, so the merge of layer l accounts for what the merged
earlier layers feed it. Within a layer (a transformer block), the inputs of its linear modules still come from the
expert's own block (its attention, its norms), on the merged model's input to that block, as FusionBench's
``regmean_plusplus`` does.

:func:`regmean_plusplus` runs that pass: for each layer in the order the forward calls them, it loads expert i's
layer into the model (every earlier layer merged), runs task i's batches through the model up to the end of that
layer with hooks on the layer's ``nn.Linear`` modules (the :class:`~lightning_merge.capture.grams.GramAccumulator`
of the capture), and merges the layer's tensors with :class:`~lightning_merge.RegMean`'s per-tensor merge before
going on to the next. The result carries every expert's Gram matrices: ``merge(result.experts, base,
result.strategy, out=...)`` writes the same model through any output, since RegMean merges each tensor from its own
values and Gram matrices only.

As FusionBench (``fusion_bench.method.regmean_plusplus``, 0.2.33): the Gram matrix is the mean xxᵀ over the input
rows, the off-diagonal entries scaled by α = 0.95 (``reduce_non_diagonal_ratio``), 256 examples per task, every
tensor without a Gram matrix (norms, biases, embeddings) the experts' mean, the first layer's inputs computed on the
merged (mean) embeddings. Where it differs, see :func:`regmean_plusplus`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.capture.fisher import limited_batches
from lightning_merge.capture.grams import GramAccumulator, default_forward
from lightning_merge.engine.run import merge
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies.functional import BLOCK_PATTERN
from lightning_merge.strategies.regmean import RegMean


class _LayerDone(Exception):
    """Raised by the hook on the layer after the one measured: the rest of the forward is not needed."""


@dataclass(frozen=True)
class RegMeanPlusPlus:
    """What :func:`regmean_plusplus` computed.

    Attributes:
        state: the merged model's tensors (those the experts hold), as :func:`~lightning_merge.merge` returns them;
            the ``model`` passed in holds them too.
        grams: per expert, ``{weight name: mean input Gram matrix (in, in)}`` read on the merged model, for every
            linear weight inside a layer that the forward reached.
        layers: the layers merged in order, by module name (the order of the forward).
        experts: the experts as in-memory :class:`~lightning_merge.Expert` handles carrying these Gram matrices as
            their ``gram`` statistics, each tensor in the dtype its expert declares (a LoRA adapter's θ₀ + ΔW
            rounded to its base's dtype, the values the layers were merged from).
        strategy: the :class:`~lightning_merge.RegMean` the layers were merged with: ``merge(result.experts, base,
            result.strategy, out=...)`` writes ``state`` to any output.
    """

    state: dict[str, Tensor]
    grams: list[dict[str, Tensor]]
    layers: list[str]
    experts: list[Expert]
    strategy: RegMean


def find_layers(model: nn.Module, names: Iterable[str], pattern: str = BLOCK_PATTERN) -> list[str]:
    """The layers of ``model`` that RegMean++ merges one after another (the default of
    :func:`regmean_plusplus`'s ``layers``).

    Args:
        model: the module.
        names: the weight names to merge; only ``nn.Linear`` modules whose ``weight`` is among them count.
        pattern: a regular expression whose first group is a block's number in a module name (LiNeS' and
            AdaMerging's numbering: the first integer component).

    Returns:
        For every counted linear module, the module whose name ends at that group (``encoder.layer.3`` for
        ``encoder.layer.3.attention.self.query``), or the linear module itself when its name has no match (a head,
        a pooler); each once, in the modules' order (:func:`regmean_plusplus` orders them by the forward).
    """
    wanted = set(names)
    layers: list[str] = []
    for prefix, child in model.named_modules():
        if not isinstance(child, nn.Linear) or f"{prefix}.weight" not in wanted:
            continue
        found = re.search(pattern, prefix)
        layer = prefix[: found.end(1)] if found else prefix
        if layer not in layers:
            layers.append(layer)
    return layers


def regmean_plusplus(
    model: nn.Module,
    experts: Sequence[Any],
    loaders: Sequence[Iterable[Any]],
    base: Any = None,
    *,
    alpha: float = 0.95,
    weights: Sequence[float] | float | None = None,
    layers: Sequence[str] | None = None,
    num_examples: int = 256,
    forward: Callable[[Any], Any] | None = None,
    transfer: Callable[[Any], Any] | None = None,
) -> RegMeanPlusPlus:
    """Merge ``experts`` with RegMean++: each layer's Gram matrices read on the model whose earlier layers are
    already merged (see the module docstring).

    Example::

        result = regmean_plusplus(model, ["runs/a/final.safetensors", "runs/b/final.safetensors"],
                                  [loader_a, loader_b], base="base.safetensors")
        merge(result.experts, "base.safetensors", result.strategy, out="merged/")   # the same model, on disk

    Args:
        model: a module of the experts' architecture, named like their tensors (``Expert(..., prefix=...)``
            otherwise). Its tensors are overwritten during the pass, and it ends holding the merged model; tensors
            the experts do not hold (a task's head) keep their values. Run in eval mode, without gradients, on its
            own device.
        experts: the experts (anything :class:`~lightning_merge.Expert` accepts), all with the same tensors.
        loaders: one iterable of batches per expert: that expert's task data (the Gram matrices of expert i are
            read on ``loaders[i]``). The first ``num_examples`` examples are read once and kept in memory.
        base: the base model, or None. RegMean's merge does not need one (the mean of the experts, in exact
            arithmetic, whatever the reference); when given, the solve is done on differences from it.
        alpha: the scale of the Gram matrices' off-diagonal entries (FusionBench's ``reduce_non_diagonal_ratio``,
            0.95 in its configuration; 1 is RegMean++ as derived). As :class:`~lightning_merge.RegMean`'s.
        weights: one weight per expert (or one for all), as :class:`~lightning_merge.RegMean`'s: it multiplies
            the expert's Gram matrices and its share of the mean elsewhere. None: 1.
        layers: the module names of the layers merged one after another (each holds the linear modules whose
            Gram matrices it reads; a linear module outside every layer is a layer of its own). Default:
            :func:`find_layers` (the blocks numbered in the tensor names, ``layers.3``, and any other linear
            module). Each must be called once per forward.
        num_examples: examples read from each loader (FusionBench's ``num_regmean_examples``, 256); the last batch
            is cut to it.
        forward: runs ``model`` on a batch (default: :func:`~lightning_merge.capture.grams.default_forward`:
            the module's ``fisher_logits``, else ``model(x)`` for a ``(x, ...)`` batch, ``model(**batch)`` without
            ``labels`` for a mapping, ``model(batch)`` for a tensor). A mapping batch's ``attention_mask`` keeps
            padded positions out of the Gram matrices.
        transfer: applied to each batch when it is read (moving it to the model's device).

    Returns:
        A :class:`RegMeanPlusPlus`: the merged state, the Gram matrices, the layers' order, the experts carrying
        the Gram matrices and the RegMean strategy that writes the merge from them.

    Raises:
        ValueError: no experts, a number of loaders that is not the number of experts, experts with different
            tensors, an expert tensor the model does not have, a loader with no examples, a layer that is not a
            module of the model, inside another layer, or called more than once per forward, or no linear layer
            to merge.
    """
    strategy = RegMean(alpha=alpha, weights=list(weights) if isinstance(weights, (list, tuple)) else weights)
    if not experts:
        raise ValueError("regmean_plusplus needs at least one expert")
    if len(loaders) != len(experts):
        raise ValueError(f"regmean_plusplus: {len(loaders)} loaders for {len(experts)} experts; pass one loader of "
                         "each expert's task data per expert, in the experts' order")
    handles = [as_expert(e) for e in experts]
    base_handle = as_expert(base, "base") if base is not None else None
    names = _merged_names(model, handles, base_handle)
    # each expert's tensors in the dtype it declares (an adapter's θ₀ + ΔW rounded to its base's dtype, as a merged
    # checkpoint of it would be): the values the layers are merged from here, and that merge() reads back
    stored = [{n: h.tensor(n).to(h.spec(n).dtype) for n in h.names()} for h in handles]
    tensors = {n: [s[n].float() for s in stored] for n in names}
    reference = {n: base_handle.float32(n) for n in names} if base_handle is not None else {}
    own = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    layer_names = list(layers) if layers is not None else find_layers(model, names)
    _check_layers(layer_names, modules)
    if not layer_names:
        raise ValueError(f"regmean_plusplus: {type(model).__name__} has no nn.Linear whose weight the experts hold; "
                         "RegMean++ merges linear layers")
    run = forward or default_forward(model)
    batches = []
    for i, (handle, loader) in enumerate(zip(handles, loaders)):
        kept = list(limited_batches(loader, num_examples, transfer))
        if not kept:
            raise ValueError(f"regmean_plusplus: loaders[{i}] (expert '{handle.name}') yielded no examples")
        batches.append([b for b, _ in kept])

    def merged(name: str, grams: Sequence[Tensor | None]) -> Tensor:
        stats = [{"gram": g} if g is not None else {} for g in grams]
        return strategy.merge_tensor(name, reference.get(name), tensors[name], stats)

    def load(values: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, v in values.items():
                own[n].copy_(v)

    # every tensor starts as the mean (RegMean's value without Gram matrices): the embeddings, norms and tensors
    # outside the layers keep it; each layer is then merged with the Gram matrices read on this model
    load({n: merged(n, [None] * len(handles)) for n in names})
    was_training = model.training
    model.eval()
    try:
        order = _forward_order(model, modules, layer_names, run, batches[0][0])
        unreached = [n for n in layer_names if n not in order]
        if unreached:
            warnings.warn(f"regmean_plusplus: the forward never calls layer '{unreached[0]}' ({len(unreached)} such); "
                          "its tensors keep the experts' mean", stacklevel=2)
        grams: list[dict[str, Tensor]] = [{} for _ in handles]
        for position, layer in enumerate(order):
            inside = _linears(modules[layer], layer, names)
            owned = [n for n in names if _inside(n, layer)]
            stop = modules[order[position + 1]] if position + 1 < len(order) else None
            for i in range(len(handles)):
                load({n: tensors[n][i] for n in owned})
                sums, rows = _layer_grams(inside, run, batches[i], stop)
                for n, total in sums.items():
                    if rows.get(n):
                        grams[i][n] = (total / rows[n]).cpu()
            load({n: merged(n, [grams[i].get(n) for i in range(len(handles))]) for n in owned})
    finally:
        model.train(was_training)
    carried = [Expert(s, statistics={"gram": g} if g else None, name=h.name)
               for s, h, g in zip(stored, handles, grams)]
    state = merge(carried, base_handle, strategy, on_missing_statistic="uniform", progress=False)
    load({n: state[n] for n in names})
    return RegMeanPlusPlus(state=state, grams=grams, layers=order, experts=carried, strategy=strategy)


def _merged_names(model: nn.Module, handles: list[Expert], base: Expert | None) -> list[str]:
    """The floating tensors the experts hold, checked against each other, the model and the base."""
    first = handles[0]
    names = [n for n in first.names() if first.spec(n).is_floating]
    for handle in handles[1:]:
        missing = [n for n in names if n not in handle]
        if missing:
            raise ValueError(f"regmean_plusplus: expert '{handle.name}' has no tensor '{missing[0]}' that expert "
                             f"'{first.name}' holds ({len(missing)} such); merge experts of one architecture")
    own = model.state_dict()
    unknown = [n for n in names if n not in own]
    if unknown:
        raise ValueError(f"regmean_plusplus: the model has no tensor '{unknown[0]}' that expert '{first.name}' holds "
                         f"({len(unknown)} such); name the experts like the model's state_dict "
                         "(Expert(..., prefix=...))")
    if base is not None:
        lacking = [n for n in names if n not in base]
        if lacking:
            raise ValueError(f"regmean_plusplus: the base has no tensor '{lacking[0]}' ({len(lacking)} such)")
    return names


def _check_layers(layers: list[str], modules: Mapping[str, nn.Module]) -> None:
    for layer in layers:
        if layer not in modules:
            raise ValueError(f"regmean_plusplus: layers names '{layer}', which is not a module of the model")
        outer = next((o for o in layers if o != layer and _inside(layer, o)), None)
        if outer is not None:
            raise ValueError(f"regmean_plusplus: layer '{layer}' is inside layer '{outer}'; list disjoint layers")


def _inside(name: str, layer: str) -> bool:
    return layer == "" or name == layer or name.startswith(layer + ".")


def _linears(module: nn.Module, layer: str, names: Sequence[str]) -> dict[str, nn.Linear]:
    """``{weight name: linear}`` for the linear modules in ``module`` (the layer ``layer``) whose weight is merged."""
    wanted = set(names)
    out = {}
    for prefix, child in module.named_modules():
        full = ".".join(p for p in (layer, prefix) if p)
        if isinstance(child, nn.Linear) and f"{full}.weight" in wanted:
            out[f"{full}.weight"] = child
    return out


def _forward_order(model: nn.Module, modules: Mapping[str, nn.Module], layers: list[str],
                   run: Callable[[Any], Any], batch: Any) -> list[str]:
    """The layers in the order one forward calls them; a layer called twice is refused."""
    calls: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: calls.append(n)) for n in layers]
    try:
        with torch.no_grad():
            run(batch)
    finally:
        for h in handles:
            h.remove()
    twice = next((n for n in calls if calls.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"regmean_plusplus: layer '{twice}' is called {calls.count(twice)} times per forward; "
                         "RegMean++ merges layers that each run once, in order (pass layers= to group them)")
    return calls


def _layer_grams(linears: Mapping[str, nn.Linear], run: Callable[[Any], Any], batches: list[Any],
                 stop: nn.Module | None) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Σ xxᵀ and row counts of ``linears``' inputs over ``batches``, each forward stopped where ``stop`` begins."""
    acc = GramAccumulator(linears).attach()

    def halt(module: nn.Module, args: Any) -> None:
        raise _LayerDone

    handle = stop.register_forward_pre_hook(halt) if stop is not None else None
    try:
        with torch.no_grad():
            for batch in batches:
                acc.set_batch(batch)
                try:
                    run(batch)
                except _LayerDone:
                    pass
    finally:
        acc.detach()
        if handle is not None:
            handle.remove()
    return acc.sums, acc.rows


__all__ = ["RegMeanPlusPlus", "find_layers", "regmean_plusplus"]
