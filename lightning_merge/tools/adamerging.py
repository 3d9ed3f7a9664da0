"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabeled inputs.

θ(λ) = θ₀ + Σₖ λₖ,ₗ τₖ, with one coefficient per expert k and per tensor l ("layer-wise", the paper's and
FusionBench's default: every parameter tensor is a layer) or per block ("block": layers numbered as LiNeS numbers
them, one more column for tensors outside any block). :class:`AdaMerging` is a LightningModule whose only parameters
are the λ: a Trainer fits it on batches of unlabeled inputs, minimising the Shannon entropy of the merged model's
predictions (summed over tasks when the model returns one set of logits per task), and
:meth:`AdaMerging.strategy` turns the learned λ into a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy,
so the merged model is written by :func:`~lightning_merge.merge` like any other merge, through any output.

As FusionBench: λ starts at 0.3, Adam with learning rate 1e-3, entropy −Σ p log(p + 1e-8) averaged over examples,
no clamping unless asked. The base and the N task vectors are held in memory in float32 ((N + 1)× the merged
tensors' size): a method for models that fit in memory N + 1 times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_merge.capture.fisher import logits_of
from lightning_merge.sources.expert import as_expert
from lightning_merge.strategies.functional import BLOCK_PATTERN
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic

TENSOR_PATTERN = r"^(.*)$"  # every tensor its own block (LayerwiseTaskArithmetic's pattern for tensor-wise λ)
DEFAULT_COLUMN = "default"


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean Shannon entropy −Σ p log(p + eps) of the softmax of ``logits`` (..., C), over every leading position."""
    probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    return -(probs * torch.log(probs + eps)).sum(-1).mean()


def _logits(output: Any) -> Any:
    """A mapping of per-task outputs as it is, else the logits in the output (:func:`~lightning_merge.capture.fisher`'s
    reading of a tensor, a Hugging Face output, a tuple)."""
    if isinstance(output, Mapping):
        return output
    return logits_of(output, "pass AdaMerging(logits_fn=...)")


class AdaMerging(pl.LightningModule):
    """Learn per-layer (or per-block) merging coefficients by entropy minimisation on unlabeled inputs.

    Example::

        ada = AdaMerging(model, experts, base)                 # model: the architecture (its weights are not used)
        pl.Trainer(max_steps=500).fit(ada, unlabeled_loader)
        merged = merge(experts, base, ada.strategy(), out="merged/")

    Args:
        model: a module of the merged architecture; it is called with the merged tensors in place of its own
            (``torch.func.functional_call``) and never trained.
        experts: the experts (anything :class:`~lightning_merge.Expert` accepts), named like ``model``'s state dict
            (use ``Expert(..., prefix=...)`` otherwise).
        base: the base model the task vectors are taken from.
        granularity: ``"tensor"`` (one λ per expert and parameter tensor: AdaMerging's layer-wise mode) or
            ``"block"`` (one λ per expert and block, blocks found by ``pattern``; tensors outside any block share one
            more column).
        init: the initial value of every λ (0.3, as the paper and FusionBench).
        lr: Adam's learning rate (1e-3).
        clamp: keep every λ in [0, 1] after each step (FusionBench's ``clamp_weights``; off by default, as there).
        logits_fn: ``logits_fn(ada, batch)`` returns the logits (..., C) of the merged model on a batch, or a mapping
            ``{task: logits}`` whose entropies are summed; ``ada(...)`` runs the merged model. Default: ``ada(x)``
            for a tuple batch ``(x, ...)`` (labels are ignored), ``ada(**batch)`` for a mapping (without
            ``labels``), ``ada(batch)`` for a tensor; Hugging Face outputs give their ``.logits``.
        pattern: the block pattern of ``granularity="block"`` (LiNeS' numbering by default).
        include: a regular expression (with ``granularity="tensor"``); only the tensors whose name matches are
            merged with learned λ (others keep the base's values). Default: every floating tensor of the base.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Any],
        base: Any,
        *,
        granularity: Literal["tensor", "block"] = "tensor",
        init: float = 0.3,
        lr: float = 1e-3,
        clamp: bool = False,
        logits_fn: Callable[[AdaMerging, Any], Any] | None = None,
        pattern: str = BLOCK_PATTERN,
        include: str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in ("tensor", "block"):
            raise ValueError(f"AdaMerging: granularity must be 'tensor' or 'block', got {granularity!r}")
        if not experts:
            raise ValueError("AdaMerging needs at least one expert")
        if lr <= 0:
            raise ValueError(f"AdaMerging: lr must be > 0, got {lr}")
        if include is not None and granularity == "block":
            raise ValueError("AdaMerging: include= selects tensors, so it needs granularity='tensor' (a block's λ "
                             "would also move the block's excluded tensors in the merged strategy)")
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.granularity = granularity
        self.lr = lr
        self.clamp = clamp
        self.logits_fn = logits_fn
        self.pattern = TENSOR_PATTERN if granularity == "tensor" else pattern
        base_expert = as_expert(base, "base")
        handles = [as_expert(e) for e in experts]
        own = set(self.model.state_dict())
        names = [n for n in base_expert.names() if base_expert.spec(n).is_floating
                 and (include is None or re.search(include, n))]
        for handle in handles:
            lacking = [n for n in names if n not in handle.names()]
            if lacking:
                raise ValueError(f"AdaMerging: expert '{handle.name}' has no tensor '{lacking[0]}' (of "
                                 f"{len(lacking)} missing); merge experts of one architecture")
        unknown = [n for n in names if n not in own]
        if unknown:
            raise ValueError(f"AdaMerging: the model has no tensor '{unknown[0]}' that the base holds ({len(unknown)} "
                             "such); name the experts like the model's state_dict (Expert(..., prefix=...))")
        self.names = names
        self._base = {n: base_expert.float32(n) for n in names}
        self._taus = [{n: h.float32(n) - self._base[n] for n in names} for h in handles]
        columns: dict[str, int] = {}
        self._column = {}
        for n in names:
            key = self._block(n)
            self._column[n] = columns.setdefault(key, len(columns))
        self.columns = list(columns)
        self.lambdas = nn.Parameter(torch.full((len(handles), len(columns)), float(init)))

    def _block(self, name: str) -> str:
        found = re.search(self.pattern, name)
        if found is None:
            return DEFAULT_COLUMN
        key = found.group(1)
        return str(int(key)) if key.isdigit() else key

    # -- the merged model -------------------------------------------------------------------------------------------
    def _to(self, device: torch.device) -> None:
        if next(iter(self._base.values())).device != device:
            self._base = {n: t.to(device) for n, t in self._base.items()}
            self._taus = [{n: t.to(device) for n, t in tau.items()} for tau in self._taus]

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ₀ + Σₖ λₖ,ₗ τₖ for every merged tensor (differentiable in λ)."""
        self._to(self.lambdas.device)
        out = {}
        for n in self.names:
            column = self.lambdas[:, self._column[n]]
            merged = self._base[n]
            for k, tau in enumerate(self._taus):
                merged = merged + column[k] * tau[n]
            out[n] = merged
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The merged model called on ``args`` / ``kwargs``."""
        return functional_call(self.model, self.merged_parameters(), args, kwargs, strict=False)

    def _default_logits(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return self(**{k: v for k, v in batch.items() if k != "labels"})
        if isinstance(batch, (tuple, list)):
            return self(batch[0])
        return self(batch)

    def entropy(self, batch: Any) -> Tensor:
        """The summed (over tasks) mean entropy of the merged model's predictions on ``batch``."""
        out = _logits(self.logits_fn(self, batch) if self.logits_fn is not None else self._default_logits(batch))
        if isinstance(out, Mapping):
            return sum(entropy_loss(_logits(v)) for v in out.values())
        return entropy_loss(out)

    # -- Lightning ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.entropy(batch)
        self.log("entropy", loss, prog_bar=True, batch_size=1)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.clamp:
            with torch.no_grad():
                self.lambdas.clamp_(0.0, 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.lambdas], lr=self.lr)

    # -- results -------------------------------------------------------------------------------------------------------
    def coefficients(self) -> dict[str, list[float]]:
        """The learned λ: ``{block or tensor name: [λ₁, …, λ_N]}``."""
        values = self.lambdas.detach().cpu().double()
        return {key: [float(v) for v in values[:, j]] for j, key in enumerate(self.columns)}

    def strategy(self) -> LayerwiseTaskArithmetic:
        """The learned λ as a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy: ``merge(experts, base,
        ada.strategy())`` writes the model this module computes (tensors outside ``include`` keep the base: their
        coefficients are 0)."""
        coefficients = self.coefficients()
        default = coefficients.pop(DEFAULT_COLUMN, None) if self.granularity == "block" else None
        if default is None:
            default = [0.0] * self.lambdas.shape[0]
        return LayerwiseTaskArithmetic(coefficients=coefficients, default=default, pattern=self.pattern)


__all__ = ["AdaMerging", "entropy_loss"]
