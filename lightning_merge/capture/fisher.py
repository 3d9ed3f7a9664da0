"""Diagonal Fisher after training: per-example empirical, true (sampled) and exact-expectation estimators.

All are ``(1/M) Σₓ (∇ log p(y|x))²`` over M examples; the empirical estimator uses the dataset's labels, the true
one labels drawn from the model's own prediction (Matena & Raffel), and the exact one the expectation over every
class, ``(1/M) Σₓ Σ_c p(c|x) (∇ log p(c|x))²`` (one pass per class: for classifiers with one label per example
and at most :data:`EXACT_MAX_CLASSES` classes). Per-example gradients come from
``torch.func`` (``vmap`` over ``grad``), with a loop over single examples as the fallback for models that
``vmap`` cannot trace.

M counts examples (sequences, for a token-level model: log p(y|x) sums over a sequence's predicted tokens) with at
least one target other than -100; an example whose every target is -100 has no log-likelihood, adds nothing to the
sum and is not counted in M.

The module says how to get log-likelihoods through a small protocol:

    def fisher_logits(self, batch) -> tuple[Tensor, Tensor]:
        '''Logits (..., C) and integer targets (...) for ``batch``; targets equal to -100 are ignored.'''

Without that method, a batch ``(x, y, ...)`` (tuple or list) is read as inputs ``x`` and targets ``y`` with
logits ``module(x)``, and a mapping with ``"labels"`` as ``module(**inputs).logits`` (Hugging Face style); for a
Hugging Face causal language model (a ``...ForCausalLM`` / ``...LMHeadModel`` inside the module) the labels are
shifted as its own loss shifts them (position t predicts token t + 1), so the log-likelihood is the one the model's
loss uses.

:func:`batch_counts` tells the batch-empirical estimator how many sequences a batch holds and over how many predicted
units its loss is averaged (tokens for a token-mean loss), through the module's ``fisher_counts(batch)`` when it
defines one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
ESTIMATORS = ("example", "true", "exact")
#: the exact-expectation estimator runs one per-example gradient pass per class: refused above this many classes
EXACT_MAX_CLASSES = 1000

LogitsFn = Callable[[Any], tuple[Tensor, Tensor]]


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` is or holds a Hugging Face causal language model (whose loss shifts the labels)."""
    cached = getattr(module, "_lightning_merge_causal", None)
    if cached is not None:
        return bool(cached)
    found = any(type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) for m in module.modules())
    try:
        object.__setattr__(module, "_lightning_merge_causal", found)
    except (AttributeError, TypeError):
        pass
    return found


def batch_counts(batch: Any, module: nn.Module | None = None, reduction: str = "auto") -> tuple[int, int]:
    """``(sequences, predicted units)`` of a training batch: the units its loss is averaged over.

    Args:
        batch: the batch as the training step receives it.
        module: the LightningModule; its ``fisher_counts(batch) -> (sequences, units)`` wins when it defines one.
        reduction: how the loss reduces: ``"example_mean"`` (units = sequences), ``"token_mean"`` (units = labels
            other than -100, shifted by one for a causal LM: Hugging Face's losses), ``"sum"`` (units = 1), or
            ``"auto"``: token mean when the batch is a mapping whose ``labels`` have a position axis (2-D or more),
            else example mean.

    Raises:
        TypeError: the number of examples cannot be read from the batch (the message says how to declare it).
    """
    hook = getattr(module, "fisher_counts", None) if module is not None else None
    if callable(hook):
        sequences, units = hook(batch)
        return int(sequences), int(units)
    try:
        sequences = _batch_len(batch)
    except TypeError:
        raise TypeError(
            f"CurvatureCapture cannot tell how many examples a training batch of type {type(batch).__name__} holds "
            "(it needs it to scale the batch Fisher): define `fisher_counts(self, batch) -> (sequences, tokens)` on "
            "the LightningModule, or yield tensors, tuples or mappings of tensors"
        ) from None
    if reduction == "example_mean":
        return sequences, sequences
    if reduction == "sum":
        return sequences, 1
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if reduction == "token_mean" or (reduction == "auto" and isinstance(labels, Tensor) and labels.dim() >= 2):
        if not isinstance(labels, Tensor):
            raise TypeError(
                "loss_reduction='token_mean' needs a mapping batch with 'labels' (Hugging Face style); define "
                "`fisher_counts(self, batch) -> (sequences, tokens)` on the LightningModule otherwise"
            )
        if module is not None and is_causal_lm(module):
            labels = labels[..., 1:]
        return sequences, int((labels != IGNORE_INDEX).sum())
    return sequences, sequences


#: the model classes a LightningModule without ``forward`` may wrap, called in its place (names along the MRO, so
#: neither transformers nor peft is imported here)
WRAPPED_MODELS = ("PreTrainedModel", "PeftModel")
_NO_FORWARD = ("Module._forward_unimplemented", "LightningModule.forward")

PROTOCOL = (
    "define `fisher_logits(self, batch) -> (logits, targets)` on the LightningModule (logits (..., C), integer "
    "targets (...), -100 ignored), or `forward(self, **inputs)` returning the logits or a Hugging Face output, or "
    "hold one Hugging Face / PEFT model as an attribute (self.model = get_peft_model(...)); see docs/capture.md"
)


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines its own ``forward`` (a LightningModule need not)."""
    return getattr(type(module).forward, "__qualname__", "") not in _NO_FORWARD


def wrapped_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attributes of ``module`` that are Hugging Face (``PreTrainedModel``) or PEFT (``PeftModel``) models."""
    return [(name, child) for name, child in module.named_children()
            if any(c.__name__ in WRAPPED_MODELS for c in type(child).__mro__)]


def model_call(module: nn.Module) -> Callable[..., Any] | None:
    """What the post-fit passes call with a batch's inputs: ``module`` itself when its class defines ``forward``,
    else the one Hugging Face / PEFT model it holds as an attribute (the docs/lora.md pattern: a LightningModule
    whose steps call ``self.model(input_ids=..., labels=...)``); None when neither exists (:data:`PROTOCOL`)."""
    if defines_forward(module):
        return module
    wrapped = wrapped_models(module)
    return wrapped[0][1] if len(wrapped) == 1 else None


def protocol_refusal(module: nn.Module, what: str) -> str | None:
    """Why a post-fit pass cannot call ``module`` (checked before the fit), or None when it can: the module defines
    ``fisher_logits`` or ``forward``, or wraps exactly one Hugging Face / PEFT model."""
    if callable(getattr(module, "fisher_logits", None)) or model_call(module) is not None:
        return None
    wrapped = wrapped_models(module)
    held = (f"holds {len(wrapped)} Hugging Face / PEFT models ({', '.join(n for n, _ in wrapped)}), so which one to "
            "call is not known" if wrapped else "wraps no Hugging Face / PEFT model")
    return (f"{what}: {type(module).__name__} defines neither `forward` nor `fisher_logits` and {held}; the post-fit "
            f"pass needs a way to get logits from a batch: {PROTOCOL}")


def default_logits_fn(module: nn.Module) -> LogitsFn:
    """The module's ``fisher_logits`` if it has one, else the classification default (see the module docstring),
    calling the module or the Hugging Face / PEFT model it wraps (:func:`model_call`)."""
    custom = getattr(module, "fisher_logits", None)
    if callable(custom):
        return custom
    causal = is_causal_lm(module)
    call = model_call(module)
    if call is None:
        raise TypeError(protocol_refusal(module, "the post-fit Fisher"))

    def logits_fn(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
            return logits_of(call(batch[0])), batch[1]
        if isinstance(batch, Mapping) and "labels" in batch:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits, labels = logits_of(call(**inputs)), batch["labels"]
            if causal and labels.dim() >= 2:  # Hugging Face's causal-LM loss: position t predicts token t + 1
                return logits[..., :-1, :], labels[..., 1:]
            return logits, labels
        raise TypeError(
            f"cannot get log-likelihoods from {type(module).__name__} for a batch of type {type(batch).__name__}: "
            "define `fisher_logits(self, batch) -> (logits, targets)` on the module (logits (..., C), integer "
            "targets (...), -100 ignored); see docs/capture.md"
        )

    return logits_fn


def logits_of(output: Any, remedy: str = "define `fisher_logits(self, batch)` on it") -> Tensor:
    """The logits in a module's output: a tensor, a Hugging Face output's ``.logits``, or a tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the module returned {type(output).__name__}, not logits: {remedy}")


def log_likelihood(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ log p(target | logits) over every position whose target is not -100 (a scalar)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum()


def _sample_targets(logits: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from softmax(logits) where the dataset has a target (positions with -100 stay ignored)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    drawn = torch.multinomial(flat, 1, generator=generator).reshape(targets.shape).to(targets.device)
    return torch.where(targets != IGNORE_INDEX, drawn, targets)


def _split(batch: Any) -> list[Any]:
    """One-example batches (leading dimension kept) from a batch of tensors, tuples, lists and mappings."""
    size = _batch_len(batch)

    def take(obj: Any, i: int) -> Any:
        if isinstance(obj, Tensor) and obj.dim() > 0 and obj.shape[0] == size:
            return obj[i : i + 1]
        if isinstance(obj, (tuple, list)):
            return type(obj)(take(o, i) for o in obj)
        if isinstance(obj, Mapping):
            return {k: take(v, i) for k, v in obj.items()}
        return obj

    return [take(batch, i) for i in range(size)]


def split_examples(batch: Any) -> list[Any]:
    """One-example batches (leading dimension kept) from a batch of tensors, tuples, lists and mappings."""
    return _split(batch)


def batch_len(batch: Any) -> int:
    """The number of examples in a batch (the leading dimension of its first tensor)."""
    return _batch_len(batch)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, (Tensor, tuple, list, Mapping)):
                return _batch_len(item)
    if isinstance(batch, Mapping):
        for item in batch.values():
            if isinstance(item, (Tensor, tuple, list, Mapping)):
                return _batch_len(item)
    raise TypeError(f"cannot tell the number of examples in a batch of type {type(batch).__name__}")


def labelled(targets: Tensor) -> bool:
    """Whether one example's targets hold a label (any entry other than -100): only those count in M."""
    return bool((targets != IGNORE_INDEX).any())


def per_example_squared_grads(
    module: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    targets_override: Tensor | None,
    logits_fn: LogitsFn,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Σ over the examples of ``batch`` of (∇ log p(y|x))² (times ``weights[i]`` when given), one gradient per
    example, by a loop over single examples (exact for any module; ``compute_fisher`` uses vmap first)."""
    return _loop_squared_grads(module, params, batch, targets_override, logits_fn, weights)[0]


def _loop_squared_grads(
    module: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    targets_override: Tensor | None,
    logits_fn: LogitsFn,
    weights: Tensor | None = None,
) -> tuple[dict[str, Tensor], int]:
    """:func:`per_example_squared_grads` and the number of the batch's examples with a label."""
    out = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    examples = _split(batch)
    count = 0
    for i, example in enumerate(examples):
        module.zero_grad(set_to_none=True)
        logits, targets = logits_fn(example)
        if targets_override is not None:
            targets = targets_override[i : i + 1]
        count += labelled(targets)
        ll = log_likelihood(logits, targets)
        grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
        w = 1.0 if weights is None else float(weights[i])
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                out[name].add_(g.float().square(), alpha=w)
    return out, count


def compute_fisher(
    module: nn.Module,
    dataloader: Iterable[Any],
    *,
    estimator: str = "example",
    num_examples: int = 512,
    samples: int = 1,
    seed: int = 0,
    logits_fn: LogitsFn | None = None,
    names: Iterable[str] | None = None,
    transfer: Callable[[Any], Any] | None = None,
    use_vmap: bool = True,
    allow_empty: bool = False,
) -> tuple[dict[str, Tensor], int]:
    """Sum over examples of the squared per-example gradient of log p(y|x), for every trainable parameter.

    The module is put in eval mode (dropout off) for the pass and restored afterwards. Call
    ``sums[name] / count`` for the estimate; the split lets distributed callers add sums and counts over ranks.

    Args:
        module: the model; its ``fisher_logits(batch)`` is used when present (see the module docstring).
        dataloader: batches to read until ``num_examples`` examples are seen.
        estimator: ``"example"`` (the dataset's labels: empirical Fisher), ``"true"`` (labels drawn from the
            model's prediction, ``samples`` draws per example) or ``"exact"`` (the expectation over every class,
            weighted by the model's probabilities: one pass per class; one label per example, at most
            :data:`EXACT_MAX_CLASSES` classes).
        num_examples: how many examples to read at most; M counts those among them with a label (a target other
            than -100; for sequences, at least one predicted token).
        samples: label draws per example for the true Fisher (ignored for ``"example"``).
        seed: seed of the label draws.
        logits_fn: overrides how a batch becomes ``(logits, targets)``.
        names: the parameters to compute (default: every parameter with ``requires_grad``).
        transfer: applied to each batch before use (for example moving it to the module's device).
        use_vmap: try ``torch.func.vmap`` first (fast); a module it cannot trace falls back to a loop.
        allow_empty: return zero sums and a count of 0 when the dataloader yields no examples (one rank's share of a
            short loader, which the caller adds over ranks), instead of raising.

    Returns:
        ``(sums, count)``: float32 sums of squared per-example gradients by parameter name, and M (the examples
        read with at least one target other than -100).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    logits_fn = logits_fn or default_logits_fn(module)
    wanted = set(names) if names is not None else None
    params = {n: p for n, p in module.named_parameters() if (p.requires_grad if wanted is None else n in wanted)}
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to compute a Fisher for")
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    draws = samples if estimator == "true" else 1
    was_training = module.training
    module.eval()
    vmap_ok = use_vmap
    count = 0
    try:
        for batch, _ in limited_batches(dataloader, num_examples, transfer):
            for index, (override, weights, alpha) in enumerate(
                    batch_passes(estimator, logits_fn, batch, draws, generator)):
                found = None
                if vmap_ok:
                    try:
                        found = _vmap_squared_grads(module, params, batch, override, logits_fn, weights)
                    except Exception:  # models vmap cannot trace (data-dependent control flow...)
                        vmap_ok = False
                if found is None:
                    with torch.enable_grad():
                        found = _loop_squared_grads(module, params, batch, override, logits_fn, weights)
                part, with_label = found
                for name, value in part.items():
                    sums[name].add_(value, alpha=alpha)
                if index == 0:  # every pass keeps the dataset's -100 where it has them: the same examples count
                    count += with_label
    finally:
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    if count == 0 and not allow_empty:
        raise ValueError("the Fisher dataloader yielded no examples with a label (every target was -100, or no "
                         "batch at all)")
    return sums, count


Pass = tuple[Tensor | None, Tensor | None, float]  # (targets or None for the batch's, per-example weights, α)


def batch_passes(estimator: str, logits_fn: LogitsFn, batch: Any, draws: int,
                 generator: torch.Generator) -> list[Pass]:
    """The gradient passes of one batch: ``(targets, per-example weights, α)``, whose squared per-example gradients,
    weighted and times α, add up to the batch's share of the Fisher sum. ``"example"``: the dataset's targets, once;
    ``"true"``: ``draws`` sets of targets drawn from the model (from ``generator``), each α = 1/draws;
    ``"exact"``: one pass per class, weighted by p(c|x)."""
    if estimator == "exact":
        return _class_passes(logits_fn, batch)
    passes: list[Pass] = []
    for _ in range(draws):
        override = None
        if estimator == "true":
            with torch.no_grad():
                logits, targets = logits_fn(batch)
            override = _sample_targets(logits, targets, generator)
        passes.append((override, None, 1.0 / draws))
    return passes


def _class_passes(logits_fn: LogitsFn, batch: Any) -> list[tuple[Tensor, Tensor, float]]:
    """The exact estimator's passes: for every class c, targets c (where the dataset has a target) weighted by
    p(c|x) per example."""
    with torch.no_grad():
        logits, targets = logits_fn(batch)
    if targets.dim() != 1 or logits.dim() != 2:
        raise ValueError(
            f"the exact Fisher needs one class label per example (targets of shape (batch,), logits (batch, C)); got "
            f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)}. For sequences use estimator='true'"
        )
    classes = logits.shape[-1]
    if classes > EXACT_MAX_CLASSES:
        raise ValueError(
            f"the exact Fisher runs one gradient pass per class; {classes} classes is more than {EXACT_MAX_CLASSES}: "
            "use estimator='true' (sampled labels) instead"
        )
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    valid = targets != IGNORE_INDEX
    return [(torch.where(valid, torch.full_like(targets, c), targets), probs[:, c], 1.0) for c in range(classes)]


def limited_batches(dataloader: Iterable[Any], num_examples: int,
                    transfer: Callable[[Any], Any] | None = None) -> Iterator[tuple[Any, int]]:
    """``(batch, examples in it)`` from ``dataloader`` (each passed through ``transfer``) until ``num_examples``
    examples are seen, the last batch cut to what is left."""
    count = 0
    for batch in dataloader:
        if count >= num_examples:
            break
        if transfer is not None:
            batch = transfer(batch)
        size = _batch_len(batch)
        if count + size > num_examples:
            batch = _truncate(batch, num_examples - count, size)
            size = num_examples - count
        count += size
        yield batch, size


def _truncate(batch: Any, keep: int, size: int) -> Any:
    if isinstance(batch, Tensor) and batch.dim() > 0 and batch.shape[0] == size:
        return batch[:keep]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_truncate(b, keep, size) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _truncate(v, keep, size) for k, v in batch.items()}
    return batch


def _vmap_squared_grads(
    module: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    targets_override: Tensor | None,
    logits_fn: LogitsFn,
    weights: Tensor | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Σ over the examples of ``batch`` of (∇ log p(y|x))² (times ``weights[i]``) by ``vmap`` over ``grad``, and
    the number of the batch's examples with a label."""
    from torch.func import functional_call, grad, vmap

    wrapper = _LogitsModule(module, logits_fn)
    detached = {f"module.{n}": p.detach() for n, p in params.items()}
    size = _batch_len(batch)

    def one(p: dict[str, Tensor], example: Any, target: Tensor | None) -> tuple[Tensor, Tensor]:
        logits, targets = functional_call(wrapper, p, (_unsqueeze(example),), strict=False)
        if target is not None:
            targets = target.unsqueeze(0)
        return log_likelihood(logits, targets), (targets != IGNORE_INDEX).any()

    in_target = 0 if targets_override is not None else None
    per, has_label = vmap(grad(one, has_aux=True), in_dims=(None, 0, in_target), randomness="different")(
        detached, _batched_only(batch, size), targets_override
    )
    count = int(has_label.sum())
    if weights is None:
        return {n[len("module.") :]: g.float().square().sum(0) for n, g in per.items()}, count
    w = weights.float()
    return {n[len("module.") :]: torch.tensordot(w.to(g.device), g.float().square(), dims=1)
            for n, g in per.items()}, count


class _LogitsModule(nn.Module):
    """Lets ``torch.func.functional_call`` run ``logits_fn`` (which may call any method of ``module``)."""

    def __init__(self, module: nn.Module, logits_fn: LogitsFn):
        super().__init__()
        self.module = module
        self._logits_fn = logits_fn

    def forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self._logits_fn(batch)


def _unsqueeze(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.unsqueeze(0)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unsqueeze(o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _unsqueeze(v) for k, v in obj.items()}
    return obj


def _batched_only(batch: Any, size: int) -> Any:
    """vmap maps over tensors with the batch size as leading dimension; anything else is refused (fallback)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] != size:
            raise TypeError("non-batched tensor")
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_batched_only(b, size) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _batched_only(v, size) for k, v in batch.items()}
    raise TypeError(f"cannot vmap over {type(batch).__name__}")


__all__ = [
    "ESTIMATORS",
    "EXACT_MAX_CLASSES",
    "batch_counts",
    "batch_len",
    "batch_passes",
    "compute_fisher",
    "default_logits_fn",
    "defines_forward",
    "is_causal_lm",
    "labelled",
    "log_likelihood",
    "model_call",
    "protocol_refusal",
    "split_examples",
    "wrapped_models",
]
