"""FW-Merging (Chen et al., 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization").

Frank–Wolfe over the convex hull of a pool of fine-tuned checkpoints: at each iteration the merged model's gradient
∇f(θ) on the tasks' data (cross-entropy on labelled batches, or the entropy of its predictions) is compared with every
checkpoint of the pool by a linear minimisation oracle, and θ moves toward the one most aligned with −∇f:

- **hard** (FusionBench's ``FrankWolfeHardAlgorithm``): one gradient over all tasks; the oracle picks the checkpoint
  s minimising Σₗ cos(gₗ, sₗ) (``granularity="task"``; ``"layer"``: per tensor l the checkpoint minimising cos(gₗ, sₗ))
  over the experts and the initial merged model; then θ ← θ + γₜ (s − θ) with γₜ = 2/(t+2) · step_size ·
  scaling_factor. θ starts at task arithmetic θ₀ + scaling_factor · Σₖ τₖ (or at the base).
- **soft** (FusionBench's ``FrankWolfeSoftAlgorithm`` with ``merge_fn: task_arithmetic``): one gradient per task,
  each task's oracle choosing among the experts not chosen yet in this iteration (per tensor with ``"layer"``),
  until every expert is chosen; then θ ← θ + scaling_factor · ηₜ · Σⱼ (sⱼ − θ) with η₀ = 1, ηₜ = 2/(t+2) · step_size.
  θ starts at the base.

The checkpoints sₗ compared with the gradient are the experts' *weights* θ₀ + τₖ (FusionBench's cosine with each
checkpoint's state dict), not their task vectors. Every iterate is θ₀ + Σₖ Cₖ,ₗ τₖ with one coefficient per expert
and parameter tensor, so :meth:`FWMerging.strategy` hands the result to :func:`~lightning_merge.merge` as a
:class:`~lightning_merge.LayerwiseTaskArithmetic` strategy, through any output. The base, task vectors and merged
network are :class:`~lightning_merge.tools.adamerging.AdaMerging`'s (parameters merged, buffers the base's;
``include``). Not built: FusionBench's TIES step (``merge_fn: ties``, not linear in the task vectors) and soft mode's
AdaMerging step (``merge_fn: adamerging``, λ learned by entropy at each iteration).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_merge.capture.fisher import IGNORE_INDEX, logits_of
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic
from lightning_merge.tools.adamerging import AdaMerging, call_on_batch, entropy_loss

SINGLE_TASK = "task"  # the task name of a batch that is not a mapping {task: batch}


class FWMerging(pl.LightningModule):
    """Frank–Wolfe merging over a pool of experts, its gradients taken on the tasks' data.

    Fit it with a Trainer on a mapping ``{task: loader}`` (the Trainer combines the loaders and hands one batch per
    task to each step): each training step is one Frank–Wolfe iteration, and the fit stops after ``iterations``.
    Under DDP (``ddp``, ``ddp_spawn``) each process's gradient is averaged over the processes before the oracle, so
    W processes with batches of b examples choose as one process with W·b; :attr:`selections` are in the state dict.

    Example::

        fw = FWMerging(model, experts, base)                    # model: the architecture (its weights are not used)
        pl.Trainer().fit(fw, {"parity": parity_loader, "mod3": mod3_loader})
        merged = merge(experts, base, fw.strategy(), out="merged/")

    Args:
        model: a module of the merged architecture, called with the merged parameters and the base's other tensors
            (as :class:`~lightning_merge.tools.adamerging.AdaMerging` calls it); its own weights are used only for
            tensors the base lacks. The Trainer runs it in train mode, as FusionBench does.
        experts: the pool of experts (anything :class:`~lightning_merge.Expert` accepts), named like ``model``'s
            state dict. Their number need not be the number of tasks: the pool may hold experts of other tasks.
        base: the base model the task vectors are taken from.
        mode: ``"hard"`` (one gradient over all tasks, one checkpoint chosen per iteration, FusionBench's
            ``FrankWolfeHardAlgorithm``) or ``"soft"`` (one checkpoint per task, all moved toward at once,
            FusionBench's ``FrankWolfeSoftAlgorithm`` with its task-arithmetic step).
        granularity: ``"task"`` (the oracle compares whole models: the sum over tensors of the cosines) or
            ``"layer"`` (each parameter tensor chooses its own checkpoint).
        iterations: the number of Frank–Wolfe iterations (FusionBench's ``max_iters``, 10).
        step_size: the step size factor of the schedule 2/(t+2) · step_size (0.1, FusionBench's default).
        scaling_factor: hard: the task-arithmetic coefficient of the initial point and the factor of every step
            (0.3); soft: the factor of every step (0.3, fixed in FusionBench's soft step).
        init: where θ starts: ``"task_arithmetic"`` (θ₀ + scaling_factor · Σₖ τₖ) or ``"base"`` (θ₀). None: the
            mode's default, task arithmetic for hard and the base for soft (as FusionBench).
        loss: ``"cross_entropy"`` (FusionBench's default: the batches carry labels, ``(x, y)`` or a mapping with
            ``labels``; -100 is ignored) or ``"entropy"`` (the mean entropy of the predictions; labels unused).
        logits_fn: ``logits_fn(fw, task, batch)`` returns the logits (..., C) of the merged model on one task's
            batch (``fw(...)`` runs the merged model; a task's own head goes here). Default: ``fw(x)`` for a tuple
            batch ``(x, ...)``, ``fw(**batch)`` without ``labels`` for a mapping, ``fw(batch)`` for a tensor;
            Hugging Face outputs give their ``.logits``.
        include: a regular expression; only the parameters whose name matches are merged (the others are the
            base's). Default: every floating parameter of the model that the base holds.

    Raises:
        ValueError: a bad ``mode``, ``granularity``, ``iterations``, ``step_size``, ``scaling_factor``, ``init`` or
            ``loss``; or what :class:`~lightning_merge.tools.adamerging.AdaMerging` refuses (no experts, an expert
            lacking a merged tensor, nothing to merge).
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Any],
        base: Any,
        *,
        mode: Literal["hard", "soft"] = "hard",
        granularity: Literal["task", "layer"] = "task",
        iterations: int = 10,
        step_size: float = 0.1,
        scaling_factor: float = 0.3,
        init: Literal["task_arithmetic", "base"] | None = None,
        loss: Literal["cross_entropy", "entropy"] = "cross_entropy",
        logits_fn: Callable[[FWMerging, Any, Any], Any] | None = None,
        include: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"FWMerging: mode must be 'hard' or 'soft', got {mode!r}")
        if granularity not in ("task", "layer"):
            raise ValueError(f"FWMerging: granularity must be 'task' or 'layer', got {granularity!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"FWMerging: iterations must be an integer >= 1, got {iterations!r}")
        if not step_size > 0:
            raise ValueError(f"FWMerging: step_size must be > 0, got {step_size!r}")
        if not scaling_factor > 0:
            raise ValueError(f"FWMerging: scaling_factor must be > 0, got {scaling_factor!r}")
        init = init if init is not None else ("task_arithmetic" if mode == "hard" else "base")
        if init not in ("task_arithmetic", "base"):
            raise ValueError(f"FWMerging: init must be 'task_arithmetic' or 'base', got {init!r}")
        if loss not in ("cross_entropy", "entropy"):
            raise ValueError(f"FWMerging: loss must be 'cross_entropy' or 'entropy', got {loss!r}")
        if not experts:
            raise ValueError("FWMerging: experts is empty; pass the pool of experts to merge")
        self.automatic_optimization = False
        try:
            self.merger = AdaMerging(model, experts, base, granularity="tensor", init=0.0, include=include)
        except ValueError as error:
            raise ValueError(str(error).replace("AdaMerging", "FWMerging", 1)) from None
        # the coefficients are moved by the oracle (no optimizer, no gradient reaches them), but they keep
        # requires_grad: DistributedDataParallel refuses a module without a parameter that requires a gradient
        self.mode = mode
        self.granularity = granularity
        self.iterations = iterations
        self.step_size = float(step_size)
        self.scaling_factor = float(scaling_factor)
        self.init = init
        self.loss = loss
        self.logits_fn = logits_fn
        if init == "task_arithmetic":
            self.merger.lambdas.data.fill_(self.scaling_factor)
        self.register_buffer("initial", self.merger.lambdas.detach().clone())
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.selections: list[Any] = []
        self._point: dict[str, Tensor] | None = None

    # -- the merged model --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The merged tensors, in the order of the coefficients' columns."""
        return self.merger.names

    @property
    def experts_count(self) -> int:
        """The number of experts in the pool (an oracle's answer N, in hard mode, is the initial merged model)."""
        return int(self.merger.lambdas.shape[0])

    def coefficient_matrix(self) -> Tensor:
        """The current coefficients C (experts × merged tensors): θ = θ₀ + Σₖ Cₖ,ₗ τₖ."""
        return self.merger.lambdas.detach().clone()

    def merged_parameters(self) -> dict[str, Tensor]:
        """The current merged tensors θ₀ + Σₖ Cₖ,ₗ τₖ (without gradient)."""
        with torch.no_grad():
            return {n: t.detach() for n, t in self.merger.merged_parameters().items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The merged model called on ``args`` / ``kwargs`` (during a gradient, at the point it is taken)."""
        point = self._point if self._point is not None else self.merged_parameters()
        return self.merger.call_with(point, *args, **kwargs)

    # -- one Frank–Wolfe iteration ------------------------------------------------------------------------------------
    def task_loss(self, task: Any, batch: Any) -> Tensor:
        """The loss of the merged model on one task's ``batch`` (``loss``: cross-entropy or entropy).

        Raises:
            ValueError: ``loss="cross_entropy"`` and the batch carries no labels.
        """
        output = self.logits_fn(self, task, batch) if self.logits_fn is not None else call_on_batch(self, batch)
        logits = logits_of(output, "pass FWMerging(logits_fn=...)")
        if self.loss == "entropy":
            return entropy_loss(logits)
        labels = _labels(batch)
        if labels is None:
            raise ValueError(f"FWMerging: loss='cross_entropy' needs labels, but task {task!r}'s batch has none "
                             "(give batches (x, y) or mappings with 'labels', or loss='entropy')")
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(flat, labels.reshape(-1).to(flat.device).long(), ignore_index=IGNORE_INDEX)

    def gradient(self, batches: Mapping[Any, Any]) -> dict[str, Tensor]:
        """∇θ of the summed loss of ``batches`` ({task: batch}) at the current merged model, per merged tensor
        (averaged over processes under DDP; a tensor the loss does not reach gets zeros)."""
        point = {n: t.clone().requires_grad_(True) for n, t in self.merged_parameters().items()}
        self._point = point
        try:
            with torch.enable_grad():
                total = sum(self.task_loss(task, batch) for task, batch in batches.items())
                grads = torch.autograd.grad(total, list(point.values()), allow_unused=True)
        finally:
            self._point = None
        out = {}
        for (n, t), g in zip(point.items(), grads):
            g = torch.zeros_like(t) if g is None else g.detach()
            out[n] = self.trainer.strategy.reduce(g, reduce_op="mean") if self._trainer is not None else g
        return out

    def vertices(self) -> Tensor:
        """The coefficients of the pool the oracle chooses from, (V, experts, tensors): the N experts (one-hot), and
        in hard mode the initial merged model last."""
        n, columns = self.merger.lambdas.shape
        eye = torch.eye(n, dtype=self.merger.lambdas.dtype, device=self.merger.lambdas.device)
        points = eye[:, :, None].expand(n, n, columns)
        if self.mode == "hard":
            points = torch.cat([points, self.initial.to(points)[None]])
        return points

    def alignments(self, gradients: Mapping[str, Tensor], vertices: Tensor) -> Tensor:
        """cos(gₗ, sₗ) for every vertex s (coefficients, as :meth:`vertices`) and merged tensor l: (V, tensors).

        sₗ is the vertex's weight θ₀ₗ + Σₖ sₖ,ₗ τₖₗ. A zero gradient or weight counts 0 (FusionBench divides by
        zero there, gets NaN and never picks that checkpoint, or fails when every one is NaN)."""
        out = torch.zeros(vertices.shape[0], len(self.names), dtype=torch.float64)
        for v in range(vertices.shape[0]):
            weights = self.merger.merged_parameters(vertices[v])
            for j, n in enumerate(self.names):
                g, w = gradients[n].float().flatten(), weights[n].float().flatten()
                denominator = torch.linalg.vector_norm(g) * torch.linalg.vector_norm(w)
                if float(denominator) > 0:
                    out[v, j] = float(torch.dot(g, w) / denominator)
        return out

    def step(self, batches: Any) -> Any:
        """One Frank–Wolfe iteration on ``batches`` ({task: batch}, or one task's batch); what the oracle chose is
        returned and appended to :attr:`selections`: an index into the pool (N: the initial merged model) per
        iteration (hard) or per task (soft), or with ``granularity="layer"`` a mapping {tensor: index}."""
        if not isinstance(batches, Mapping) or not batches:
            batches = {SINGLE_TASK: batches}
        t = int(self.iteration)
        c = self.merger.lambdas.data
        pool = self.vertices()
        if self.mode == "hard":
            chosen, target = self._choose(self.alignments(self.gradient(batches), pool), pool, None)
            gamma = 2.0 / (t + 2) * self.step_size * self.scaling_factor
            c.add_(gamma * (target - c))
        else:
            taken = torch.zeros(pool.shape[0], len(self.names), dtype=torch.bool)
            chosen, targets = [], []
            for task, batch in batches.items():
                which, target = self._choose(self.alignments(self.gradient({task: batch}), pool), pool, taken)
                chosen.append(which)
                targets.append(target)
                if len(targets) >= self.experts_count:
                    break
            eta = 1.0 if t == 0 else 2.0 / (t + 2) * self.step_size
            c.add_(self.scaling_factor * eta * sum(target - c for target in targets))
        self.iteration += 1
        self.selections.append(chosen)
        return chosen

    def _choose(self, alignment: Tensor, pool: Tensor, taken: Tensor | None) -> tuple[Any, Tensor]:
        """The oracle: the vertex of least alignment (summed over tensors, or per tensor), skipping ``taken`` (marked
        as taken on the way), and the coefficients it moves toward."""
        if taken is not None:
            alignment = alignment.masked_fill(taken, float("inf"))
        if self.granularity == "task":
            which = int(torch.argmin(alignment.sum(1)))  # the first of equal minima, as FusionBench's strict <
            if taken is not None:
                taken[which] = True
            return which, pool[which].clone()
        picks = torch.argmin(alignment, dim=0)
        target = torch.empty_like(pool[0])
        for j, v in enumerate(picks.tolist()):
            target[:, j] = pool[v][:, j]
            if taken is not None:
                taken[v, j] = True
        return {n: int(v) for n, v in zip(self.names, picks.tolist())}, target

    # -- Lightning ---------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if int(self.iteration) >= self.iterations:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch)
        if int(self.iteration) >= self.iterations:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> None:
        return None

    def get_extra_state(self) -> dict[str, Any]:
        """:attr:`selections` in the state dict, so that a checkpoint, and ``ddp_spawn``'s return of rank 0's
        state to the main process, carry them with the coefficients."""
        return {"selections": list(self.selections)}

    def set_extra_state(self, state: Any) -> None:
        """Restores :attr:`selections` from :meth:`get_extra_state`'s mapping."""
        self.selections = list(state["selections"])

    # -- results -------------------------------------------------------------------------------------------------------
    def coefficients(self) -> dict[str, list[float]]:
        """The current coefficients per merged tensor: ``{tensor: [C₁, …, C_N]}``."""
        return self.merger.coefficients()

    def strategy(self) -> LayerwiseTaskArithmetic:
        """The merged model as a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy: ``merge(experts, base,
        fw.strategy())`` writes the network this module computes (tensors not merged: the base's)."""
        return self.merger.strategy()


def _labels(batch: Any) -> Tensor | None:
    """A batch's labels: the second item of a tuple batch, a mapping's ``labels``."""
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        labels = batch[1]
    else:
        labels = None
    return labels if isinstance(labels, Tensor) else None


__all__ = ["FWMerging"]
