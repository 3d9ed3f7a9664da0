"""Input Gram matrices of linear layers (Σ xxᵀ over the rows a layer sees), the statistic RegMean merges with.

:class:`GramAccumulator` hooks every linear layer whose weight is trained and adds xᵀx of its inputs, in float32
with autocast off, on the layer's device. Rows are the flattened leading axes of the input (examples, or tokens of a
sequence model); when the batch carries an ``attention_mask`` of the input's leading shape (a mapping batch, or a
tuple batch whose first element is one), padded positions are left out. :func:`compute_grams` runs that over a
dataloader after training (eval mode, no gradients);
:class:`~lightning_merge.callbacks.CurvatureCapture` (``gram=``) runs it during training or after the fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.capture.fisher import limited_batches, model_call, protocol_refusal


def attention_mask(batch: Any) -> Tensor | None:
    """The ``attention_mask`` of a mapping batch, or of a tuple batch whose first element is a mapping; else None."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        batch = batch[0]
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, Tensor) else None


def gram_modules(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """``{weight name: linear layer}`` for every ``nn.Linear`` of ``module`` whose weight is trained (``names``:
    the parameter names to consider; default: those with ``requires_grad``). A PEFT model's ``lora_A`` layers are
    such layers (their input is the adapted module's input); its frozen base layers are not."""
    wanted = set(names) if names is not None else {n for n, p in module.named_parameters() if p.requires_grad}
    out = {}
    for prefix, child in module.named_modules():
        if isinstance(child, nn.Linear):
            name = f"{prefix}.weight" if prefix else "weight"
            if name in wanted:
                out[name] = child
    return out


class GramAccumulator:
    """Forward hooks accumulating each hooked layer's Σ xxᵀ (float32) and its number of input rows.

    Args:
        modules: ``{weight name: linear layer}`` (see :func:`gram_modules`).
        when: called with the layer at each forward; the input is counted only when it returns True (the capture
            counts training forwards: ``module.training and torch.is_grad_enabled()``).
    """

    def __init__(self, modules: Mapping[str, nn.Module], when: Callable[[nn.Module], bool] | None = None):
        self.modules = dict(modules)
        self.when = when
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self.mask: Tensor | None = None  # the current batch's attention mask, when it has one
        self._handles: list[Any] = []

    def attach(self) -> GramAccumulator:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def detach(self) -> None:
        """Remove the hooks (the sums are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the sums and counts."""
        self.sums, self.rows = {}, {}

    def set_batch(self, batch: Any) -> None:
        """Remember the batch's ``attention_mask`` (of a mapping batch, or of the mapping that is the first element
        of a tuple batch: ``(inputs, labels)``), so padded positions are not counted."""
        self.mask = attention_mask(batch)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> None:
            if self.when is not None and not self.when(module):
                return
            x = inputs[0] if inputs else kwargs.get("input")  # linear(x) or linear(input=x)
            if not isinstance(x, Tensor):
                return
            x = x.detach()
            flat = x.reshape(-1, x.shape[-1])
            if self.mask is not None and tuple(self.mask.shape) == tuple(x.shape[:-1]):
                flat = flat[self.mask.reshape(-1).to(flat.device) != 0]
            with torch.autocast(device_type=flat.device.type, enabled=False):
                flat = flat.float()
                total = self.sums.get(name)
                if total is None or total.device != flat.device:
                    total = self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
                total.addmm_(flat.T, flat)
            self.rows[name] = self.rows.get(name, 0) + int(flat.shape[0])

        return hook


def default_forward(module: nn.Module) -> Callable[[Any], Any]:
    """How a batch runs through ``module`` for the Gram pass: its ``fisher_logits`` if it has one (the post-fit
    protocol of docs/capture.md), else ``module(x)`` for a tuple or list ``(x, ...)`` (labels, if any, unused),
    ``module(**batch)`` without ``labels`` for a mapping, ``module(batch)`` for a tensor; a LightningModule without
    ``forward`` is called through the one Hugging Face / PEFT model it holds (:func:`model_call`)."""
    custom = getattr(module, "fisher_logits", None)
    if callable(custom):
        return custom
    call = model_call(module)  # the module, or the Hugging Face / PEFT model a LightningModule without forward wraps
    if call is None:
        raise TypeError(protocol_refusal(module, "the post-fit Gram pass"))

    def run(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return call(**{k: v for k, v in batch.items() if k != "labels"})
        if isinstance(batch, (tuple, list)):
            return call(batch[0])
        return call(batch)

    return run


def compute_grams(
    module: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_examples: int = 256,
    names: Iterable[str] | None = None,
    transfer: Callable[[Any], Any] | None = None,
    forward: Callable[[Any], Any] | None = None,
    allow_empty: bool = False,
) -> tuple[dict[str, Tensor], dict[str, int], int]:
    """Σ xxᵀ of every trained linear layer's inputs over ``num_examples`` examples (eval mode, no gradients).

    Args:
        module: the model.
        dataloader: batches, read until ``num_examples`` examples are seen (the last batch is cut).
        num_examples: how many examples (FusionBench's RegMean uses 256).
        names: weight names to capture (default: every trained ``nn.Linear`` weight).
        transfer: applied to each batch first (moving it to the module's device).
        forward: runs the module on a batch (default: :func:`default_forward`).
        allow_empty: return empty sums and 0 examples when the dataloader yields none (one rank's share of a short
            loader), instead of raising.

    Returns:
        ``(sums, rows, examples)``: float32 Σ xxᵀ by weight name, the rows each layer saw, the examples read.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    layers = gram_modules(module, names)
    if not layers:
        raise ValueError(
            f"{type(module).__name__} has no trained nn.Linear layer to capture input Gram matrices of (RegMean "
            "merges linear layers; GPT-2's Conv1D layers are not supported)"
        )
    run = forward or default_forward(module)
    acc = GramAccumulator(layers).attach()
    was_training = module.training
    module.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch, size in limited_batches(dataloader, num_examples, transfer):
                acc.set_batch(batch)
                run(batch)
                count += size
    finally:
        acc.detach()
        module.train(was_training)
    if count == 0 and not allow_empty:
        raise ValueError("the Gram dataloader yielded no examples")
    return acc.sums, acc.rows, count


__all__ = ["GramAccumulator", "attention_mask", "compute_grams", "default_forward", "gram_modules"]
