"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabeled inputs.

θ(λ) = θ₀ + Σₖ λₖ,ₗ τₖ over the model's *parameters*, with one coefficient per expert k and per parameter tensor l
("layer-wise", the paper's and FusionBench's default: every parameter tensor is a layer), per block ("block": layers
numbered as LiNeS numbers them, one more column for tensors outside any block) or one for the whole model ("task":
FusionBench's task-wise AdaMerging). :class:`AdaMerging` is a LightningModule whose only parameters are the λ: a
Trainer fits it on batches of unlabeled inputs, minimising the Shannon entropy of the merged model's predictions
(summed over tasks when the model returns one set of logits per task), and :meth:`AdaMerging.strategy` turns the
learned λ into a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy, so the merged model is written by
:func:`~lightning_merge.merge` like any other merge, through any output.

The network trained on is the network written: every tensor not merged with λ (buffers such as BatchNorm's running
statistics, parameters outside ``include``) takes the base's value during training, as the strategy writes it; only
tensors of the ``model`` that the base lacks keep the model's own values.

As FusionBench: λ starts at 0.3, Adam with learning rate 1e-3, entropy −Σ p log(p + 1e-8) averaged over examples
(for sequence logits, over the positions that are not padding), parameters merged and buffers not, no clamping
unless asked. The base and the N task vectors are held in memory in float32 ((N + 1)× the merged tensors' size),
the base's other tensors once: a method for models that fit in memory N + 1 times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_merge.capture.fisher import IGNORE_INDEX, logits_of
from lightning_merge.sources.expert import as_expert
from lightning_merge.strategies.functional import BLOCK_PATTERN
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic

TENSOR_PATTERN = r"^(.*)$"  # every tensor its own block (LayerwiseTaskArithmetic's pattern for tensor-wise λ)
DEFAULT_COLUMN = "default"  # granularity="block": the column of tensors outside any block
TASK_COLUMN = "all"  # granularity="task": the one column


def entropy_loss(logits: Tensor, eps: float = 1e-8, mask: Tensor | None = None) -> Tensor:
    """Mean Shannon entropy −Σ p log(p + eps) of the softmax of ``logits`` (..., C).

    Args:
        logits: the logits, classes last: (B, C) for a classifier, (B, T, C) for a sequence model.
        eps: added to p inside the logarithm (FusionBench's 1e-8).
        mask: which positions count, shaped like ``logits`` without its last dimension (True or 1: counts). None:
            every position counts. The mean is over the positions that count (0 when none does).

    Raises:
        ValueError: ``mask``'s shape is not the leading shape of ``logits``.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    per_position = -(probs * torch.log(probs + eps)).sum(-1)
    if mask is None:
        return per_position.mean()
    if tuple(mask.shape) != tuple(per_position.shape):
        raise ValueError(f"entropy_loss: the mask's shape {tuple(mask.shape)} is not the logits' leading shape "
                         f"{tuple(per_position.shape)}")
    counts = mask.to(per_position.device).bool()
    return torch.where(counts, per_position, 0.0).sum() / counts.sum().clamp(min=1)


def _logits(output: Any) -> Any:
    """A mapping of per-task outputs as it is, else the logits in the output (:func:`~lightning_merge.capture.fisher`'s
    reading of a tensor, a Hugging Face output, a tuple)."""
    if isinstance(output, Mapping):
        return output
    return logits_of(output, "pass AdaMerging(logits_fn=...)")


class AdaMerging(pl.LightningModule):
    """Learn per-layer (per-block, or per-model) merging coefficients by entropy minimisation on unlabeled inputs.

    Example::

        ada = AdaMerging(model, experts, base)                 # model: the architecture (its weights are not used)
        pl.Trainer(max_steps=500).fit(ada, unlabeled_loader)
        merged = merge(experts, base, ada.strategy(), out="merged/")

    Args:
        model: a module of the merged architecture; it is called with the merged parameters and the base's other
            tensors in place of its own (``torch.func.functional_call``) and never trained: its own values are used
            only for tensors the base lacks. The Trainer runs it in train mode, as FusionBench does: a BatchNorm
            normalises with each batch's statistics, and its running statistics (the base's) are neither updated
            nor merged.
        experts: the experts (anything :class:`~lightning_merge.Expert` accepts), named like ``model``'s state dict
            (use ``Expert(..., prefix=...)`` otherwise).
        base: the base model the task vectors are taken from.
        granularity: ``"tensor"`` (one λ per expert and parameter tensor: AdaMerging's layer-wise mode),
            ``"block"`` (one λ per expert and block, blocks found by ``pattern``; tensors outside any block share one
            more column) or ``"task"`` (one λ per expert for every merged tensor: AdaMerging's task-wise mode,
            FusionBench's ``task_wise_adamerging``).
        init: the initial value of every λ (0.3, as the paper and FusionBench's CLIP configurations, task-wise too).
        lr: Adam's learning rate (1e-3).
        clamp: keep every λ in [0, 1] after each step (FusionBench's ``clamp_weights``; off by default, as there).
        logits_fn: ``logits_fn(ada, batch)`` returns the logits (..., C) of the merged model on a batch, or a mapping
            ``{task: logits}`` whose entropies are summed; ``ada(...)`` runs the merged model. Default: ``ada(x)``
            for a tuple batch ``(x, ...)`` (labels are ignored), ``ada(**batch)`` for a mapping (without
            ``labels``), ``ada(batch)`` for a tensor; Hugging Face outputs give their ``.logits``. Sequence logits
            (B, T, C) on a mapping batch are averaged over the positions that are not padding: where the batch's
            ``attention_mask`` is 1, else (no ``attention_mask``) where its ``labels`` are not -100 (their values
            are never read).
        pattern: the block pattern of ``granularity="block"`` (LiNeS' numbering by default).
        include: a regular expression; only the parameters whose name matches are merged with learned λ, in
            training and in :meth:`strategy` (every other tensor is the base's in both). Default: every floating
            parameter of the model that the base holds.

    Raises:
        ValueError: a bad ``granularity`` or ``lr``, no experts, an expert lacking a merged tensor, a base tensor
            the model does not have, or nothing to merge (``include`` matching no parameter).
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Any],
        base: Any,
        *,
        granularity: Literal["tensor", "block", "task"] = "tensor",
        init: float = 0.3,
        lr: float = 1e-3,
        clamp: bool = False,
        logits_fn: Callable[[AdaMerging, Any], Any] | None = None,
        pattern: str = BLOCK_PATTERN,
        include: str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in ("tensor", "block", "task"):
            raise ValueError(f"AdaMerging: granularity must be 'tensor', 'block' or 'task', got {granularity!r}")
        if not experts:
            raise ValueError("AdaMerging needs at least one expert")
        if base is None:
            raise ValueError("AdaMerging: base is None; pass the base model (base=...), whose weights the task vectors "
                             "are taken from and the merged model starts at")
        if lr <= 0:
            raise ValueError(f"AdaMerging: lr must be > 0, got {lr}")
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
        own = self.model.state_dict()
        parameters = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        candidates = [n for n in base_expert.names() if base_expert.spec(n).is_floating
                      and (include is None or re.search(include, n))]
        unknown = [n for n in candidates if n not in own]
        if unknown:
            raise ValueError(f"AdaMerging: the model has no tensor '{unknown[0]}' that the base holds ({len(unknown)} "
                             "such); name the experts like the model's state_dict (Expert(..., prefix=...))")
        names = [n for n in candidates if n in parameters]  # buffers (BatchNorm's statistics) are not merged
        if not names:
            raise ValueError(f"AdaMerging: no parameter of the model to merge (include={include!r} matches none of "
                             "the floating parameters the base holds); widen include")
        for handle in handles:
            lacking = [n for n in names if n not in handle.names()]
            if lacking:
                raise ValueError(f"AdaMerging: expert '{handle.name}' has no tensor '{lacking[0]}' (of "
                                 f"{len(lacking)} missing); merge experts of one architecture")
        self.names = names
        self._base = {n: base_expert.float32(n) for n in names}
        self._taus = [{n: h.float32(n) - self._base[n] for n in names} for h in handles]
        # every other tensor of the model that the base holds: the base's value (what strategy() writes), as the
        # model would load it (its own dtype)
        merged = set(names)
        self._kept = {n: base_expert.tensor(n).to(own[n].dtype) for n in base_expert.names()
                      if n in own and n not in merged}
        self._kept_buffers = {n for n in self._kept if n not in parameters}
        columns: dict[str, int] = {}
        self._column = {}
        for n in names:
            key = self._block(n)
            self._column[n] = columns.setdefault(key, len(columns))
        self.columns = list(columns)
        self.lambdas = nn.Parameter(torch.full((len(handles), len(columns)), float(init)))

    def _block(self, name: str) -> str:
        if self.granularity == "task":
            return TASK_COLUMN
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
            self._kept = {n: t.to(device) for n, t in self._kept.items()}

    def merged_parameters(self, coefficients: Tensor | None = None, names: Sequence[str] | None = None,
                          rows: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """θ₀ + Σₖ λₖ,ₗ τₖ for every merged tensor (differentiable in λ).

        Args:
            coefficients: other coefficients to merge at, shaped like ``lambdas`` (experts × columns); None: the
                learned λ. Given coefficients are read without gradient, and a coefficient of exactly 0 adds
                nothing (an expert's own weights are ``θ₀ + 1·τₖ``).
            names: only these merged tensors (None: all of them, in order).
            rows: ``(start, stop)``: only those rows (along the first axis) of each tensor, computed from those
                rows of θ₀ and the τₖ alone (a merge reading a large tensor in row chunks).

        Raises:
            ValueError: ``coefficients`` is not shaped like ``lambdas``.
        """
        self._to(self.lambdas.device)
        given = coefficients is not None
        if given and tuple(coefficients.shape) != tuple(self.lambdas.shape):
            raise ValueError(f"merged_parameters: coefficients {tuple(coefficients.shape)} are not shaped like the "
                             f"λ {tuple(self.lambdas.shape)} (experts × columns)")
        values = coefficients.detach().to(self.lambdas.device) if given else self.lambdas
        out = {}
        cut = slice(None) if rows is None else slice(*rows)
        for n in self.names if names is None else names:
            column = values[:, self._column[n]]
            merged = self._base[n][cut]
            for k, tau in enumerate(self._taus):
                if not (given and float(column[k]) == 0.0):
                    merged = merged + column[k] * tau[n][cut]
            out[n] = merged
        return out

    def call_with(self, parameters: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """The model called on ``args`` / ``kwargs`` with ``parameters`` for the merged tensors (a mapping like
        :meth:`merged_parameters`' answer) and the base's other tensors. Buffers are passed as copies: a BatchNorm
        in train mode leaves the base's running statistics as they are."""
        tensors = dict(parameters)
        for n, t in self._kept.items():
            tensors[n] = t.clone() if n in self._kept_buffers else t
        return functional_call(self.model, tensors, args, kwargs, strict=False)

    def other_tensors(self) -> dict[str, Tensor]:
        """The base's tensors that are not merged (buffers, parameters outside ``include``), in the model's dtypes:
        what :meth:`call_with` calls the model with besides the merged parameters, and what :meth:`strategy` writes
        for them."""
        return dict(self._kept)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The merged model called on ``args`` / ``kwargs``: the merged parameters and the base's other tensors, the
        network :meth:`strategy` writes (:meth:`call_with` at the learned λ)."""
        return self.call_with(self.merged_parameters(), *args, **kwargs)


    def entropy(self, batch: Any) -> Tensor:
        """The summed (over tasks) mean entropy of the merged model's predictions on ``batch`` (sequence logits:
        over the positions that are not padding, as ``logits_fn`` says)."""
        out = _logits(self.logits_fn(self, batch) if self.logits_fn is not None else call_on_batch(self, batch))
        mask = _positions(batch)
        if isinstance(out, Mapping):
            return sum(_entropy(_logits(v), mask) for v in out.values())
        return _entropy(out, mask)

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
        """The learned λ: ``{column: [λ₁, …, λ_N]}``, a column being a tensor's name (``"tensor"``), a block
        (``"block"``) or ``"all"`` (``"task"``)."""
        values = self.lambdas.detach().cpu().double()
        return {key: [float(v) for v in values[:, j]] for j, key in enumerate(self.columns)}

    def strategy(self) -> LayerwiseTaskArithmetic:
        """The learned λ as a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy: ``merge(experts, base,
        ada.strategy())`` writes the network this module computes and was trained as. Its coefficients are listed
        per merged tensor (``pattern=r"^(.*)$"``, whatever the granularity); every other tensor (buffers, parameters
        outside ``include``) has coefficients 0: the base's value."""
        values = self.lambdas.detach().cpu().double()
        coefficients = {n: [float(v) for v in values[:, self._column[n]]] for n in self.names}
        return LayerwiseTaskArithmetic(coefficients=coefficients, default=[0.0] * self.lambdas.shape[0],
                                       pattern=TENSOR_PATTERN)


def _positions(batch: Any) -> Tensor | None:
    """The positions of a mapping batch that are not padding: its ``attention_mask``, else ``labels != -100``."""
    if not isinstance(batch, Mapping):
        return None
    if isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    if isinstance(batch.get("labels"), Tensor):
        return batch["labels"] != IGNORE_INDEX
    return None


def _entropy(logits: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`entropy_loss` of ``logits``, over the unpadded positions when they are sequence logits (B, T, C)."""
    if mask is None or logits.dim() < 3:
        return entropy_loss(logits)
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"AdaMerging: the logits {tuple(logits.shape)} have positions {tuple(logits.shape[:-1])}, but "
                         f"the batch's padding mask (attention_mask, or labels != -100) is {tuple(mask.shape)}; pass "
                         "AdaMerging(logits_fn=...) returning the logits of the positions that count, (B, C)")
    return entropy_loss(logits, mask=mask)


def call_on_batch(model: Any, batch: Any) -> Any:
    """``model`` called on a batch as the data-using tools call their merged model by default: ``model(x)`` for a
    tuple batch ``(x, ...)``, ``model(**batch)`` without its ``labels`` for a mapping, ``model(batch)`` for a tensor."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


__all__ = ["AdaMerging", "call_on_batch", "entropy_loss"]
