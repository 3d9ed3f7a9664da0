"""FW-Merging (Chen et al., 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization").

Frank–Wolfe over the convex hull of a pool of fine-tuned checkpoints: at each iteration the merged model's gradient
∇f(θ) on the tasks' data (cross-entropy on labelled batches, or the entropy of its predictions) is compared with every
checkpoint of the pool by a linear minimisation oracle, and θ moves toward the one most aligned with −∇f:

- **hard** (FusionBench's ``FrankWolfeHardAlgorithm``): one gradient over all tasks; the oracle picks the checkpoint
  s minimising Σₗ cos(gₗ, sₗ) (``granularity="task"``; ``"layer"``: per tensor l the checkpoint minimising cos(gₗ, sₗ))
  over the experts and the initial merged model; then θ ← θ + γₜ (s − θ) with γₜ = 2/(t+2) · step_size ·
  scaling_factor. θ starts at task arithmetic θ₀ + scaling_factor · Σₖ τₖ (or at the base).
- **hard with the TIES step** (``merge_fn="ties"``, FusionBench's ``merge_fn: ties``): θ starts at TIES-merging
  θ₀ + scaling_factor · Σ_agreeing trim(τₖ) (each τₖ trimmed to its model-wide top entries by magnitude, signs
  elected on the sum, the agreeing entries summed), and each step is θ ← θ + γₜ · trim(s − θ): only the largest
  entries of s − θ over the whole model move. Both are :class:`~lightning_merge.Ties` (``topk="model"``,
  ``normalize=False``) through :func:`~lightning_merge.merge`. The trim keeps ⌊d · density⌋ + 1 of the d merged
  entries, as FusionBench's (and the TIES authors') ``topk_values_mask`` does (``|x| ≥`` its k-th smallest).
- **soft** (FusionBench's ``FrankWolfeSoftAlgorithm`` with ``merge_fn: task_arithmetic``): one gradient per task,
  each task's oracle choosing among the experts not chosen yet in this iteration (per tensor with ``"layer"``),
  until every expert is chosen; then θ ← θ + scaling_factor · ηₜ · Σⱼ (sⱼ − θ) with η₀ = 1, ηₜ = 2/(t+2) · step_size.
  θ starts at the base.
- **soft with the AdaMerging step** (``merge_fn="adamerging"``, FusionBench's ``fw_soft`` default): the same choices,
  then θ ← θ + Σⱼ λⱼ,ₗ (sⱼ − θ) with λ (one per chosen checkpoint and tensor) learned by
  :class:`~lightning_merge.tools.adamerging.AdaMerging` over base θ and the chosen checkpoints: ``ada_iters`` Adam
  steps (learning rate ``ada_lr``) on the summed entropy of the tasks' predictions, λ starting at scaling_factor
  (FusionBench's 0.3) at the first iteration and at ``ada_coeff`` after.

The checkpoints sₗ compared with the gradient are the experts' *weights* θ₀ + τₖ (FusionBench's cosine with each
checkpoint's state dict), not their task vectors. With the task-arithmetic and AdaMerging steps every iterate is
θ₀ + Σₖ Cₖ,ₗ τₖ with one coefficient per expert and parameter tensor, so :meth:`FWMerging.strategy` hands the result
to :func:`~lightning_merge.merge` as a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy, through any output.
The TIES step is not of that form: its trim is per entry, so an iterate is θ₀ + Σₖ Cₖ ⊙ τₖ with coefficient maps Cₖ of
the parameters' shapes, as large as the experts themselves. No strategy smaller than the merged model reproduces
it (a strategy recomputing the T model-wide trims from the experts would hold the history and redo the run), so
with ``merge_fn="ties"`` :meth:`FWMerging.strategy` refuses and :meth:`FWMerging.merged_state` returns the merged
model's state dict, written through any output as the one expert of ``Linear()`` over the base (with ``dtype=``).
The base, task vectors and merged network are :class:`~lightning_merge.tools.adamerging.AdaMerging`'s (parameters
merged, buffers the base's; ``include``). Memory beyond AdaMerging's: the TIES step holds two more copies of the
merged tensors (the iterate and the initial merge; the TIES start reads the experts' weights tensor by tensor) and
runs one model-wide ``merge()`` per iteration; the AdaMerging step builds an AdaMerging over the chosen checkpoints
at each iteration (its copies: one per chosen checkpoint and one of θ, on the CPU first).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_merge.capture.fisher import IGNORE_INDEX, logits_of
from lightning_merge.engine.run import merge
from lightning_merge.files.safetensors import TensorSpec
from lightning_merge.sources.expert import Expert
from lightning_merge.strategies.functional import keep_count
from lightning_merge.strategies.layerwise import LayerwiseTaskArithmetic
from lightning_merge.strategies.task_vectors import Ties
from lightning_merge.tools.adamerging import AdaMerging, call_on_batch, entropy_loss

SINGLE_TASK = "task"  # the task name of a batch that is not a mapping {task: batch}
STEPS = {"hard": ("task_arithmetic", "ties"), "soft": ("task_arithmetic", "adamerging")}  # FusionBench's, per mode


class _VertexSource:
    """An expert source whose tensor ``n`` is vertex ``v``'s weights θ₀ + Σₖ sₖ,ₙ τₖ, built (on the CPU) when read;
    a merge reading a large tensor in row chunks gets each chunk built from those rows alone (``reads_rows``)."""

    reads_rows = True

    def __init__(self, fw: FWMerging, vertex: Tensor):
        self.fw, self.vertex = fw, vertex

    def keys(self) -> list[str]:
        return list(self.fw.names)

    def spec(self, key: str) -> TensorSpec:
        return TensorSpec(tuple(self.fw.shapes[key]), torch.float32)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        return self.fw.merger.merged_parameters(self.vertex, names=[key], rows=rows)[key].detach().cpu()


class _VertexWeights(Expert):
    """Vertex ``v``'s weights as an expert read tensor by tensor (:class:`_VertexSource`)."""

    def __init__(self, fw: FWMerging, vertex: Tensor):
        super().__init__({}, name="FW-Merging vertex")
        self._source = _VertexSource(fw, vertex)
        self._keys = {k: k for k in fw.names}


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

        fw = FWMerging(model, experts, base, merge_fn="ties")   # the TIES step: a state, not a strategy
        pl.Trainer().fit(fw, loaders)
        merged = merge([fw.merged_state()], base, Linear(), out="merged/", dtype="bfloat16")  # dtype: the base's

    Args:
        model: a module of the merged architecture, called with the merged parameters and the base's other tensors
            (as :class:`~lightning_merge.tools.adamerging.AdaMerging` calls it); its own weights are used only for
            tensors the base lacks. The Trainer runs it in train mode, as FusionBench does.
        experts: the pool of experts (anything :class:`~lightning_merge.Expert` accepts), named like ``model``'s
            state dict. Their number need not be the number of tasks: the pool may hold experts of other tasks.
        base: the base model the task vectors are taken from.
        mode: ``"hard"`` (one gradient over all tasks, one checkpoint chosen per iteration, FusionBench's
            ``FrankWolfeHardAlgorithm``) or ``"soft"`` (one checkpoint per task, all moved toward at once,
            FusionBench's ``FrankWolfeSoftAlgorithm``).
        merge_fn: the step (FusionBench's name): ``"task_arithmetic"`` (both modes), ``"ties"`` (hard: the TIES
            start and steps; FusionBench's soft mode has none) or ``"adamerging"`` (soft: coefficients learned by
            entropy at each iteration, FusionBench's ``fw_soft`` default; its hard mode has none).
        granularity: ``"task"`` (the oracle compares whole models: the sum over tensors of the cosines) or
            ``"layer"`` (each parameter tensor chooses its own checkpoint).
        iterations: the number of Frank–Wolfe iterations (FusionBench's ``max_iters``, 10).
        step_size: the step size factor of the schedule 2/(t+2) · step_size (0.1, FusionBench's default).
        scaling_factor: hard: the coefficient of the initial merge and the factor of every step (0.3); soft: the
            factor of every task-arithmetic step, and the AdaMerging step's first λ (0.3, fixed in FusionBench).
        init: where θ starts: ``"task_arithmetic"`` (θ₀ + scaling_factor · Σₖ τₖ), ``"base"`` (θ₀) or, with
            ``merge_fn="ties"`` only, ``"ties"`` (θ₀ + scaling_factor · TIES(τ₁, …, τ_N)). None: the mode's default,
            FusionBench's: the step's own merge for hard (task arithmetic or TIES), the base for soft.
        loss: ``"cross_entropy"`` (FusionBench's default: the batches carry labels, ``(x, y)`` or a mapping with
            ``labels``; -100 is ignored) or ``"entropy"`` (the mean entropy of the predictions; labels unused).
        logits_fn: ``logits_fn(fw, task, batch)`` returns the logits (..., C) of the merged model on one task's
            batch (``fw(...)`` runs the merged model; a task's own head goes here). Default: ``fw(x)`` for a tuple
            batch ``(x, ...)``, ``fw(**batch)`` without ``labels`` for a mapping, ``fw(batch)`` for a tensor;
            Hugging Face outputs give their ``.logits``.
        include: a regular expression; only the parameters whose name matches are merged (the others are the
            base's). Default: every floating parameter of the model that the base holds.
        density: ``merge_fn="ties"``: the fraction of the d merged entries each trim keeps, ⌊d · density⌋ + 1 of
            them (FusionBench's ``threshold`` 20, in percent: 0.2). The trim is over the merged tensors only
            (FusionBench's over the whole state dict, buffers included).
        ada_iters: ``merge_fn="adamerging"``: Adam steps per iteration (FusionBench's 500).
        ada_coeff: ``merge_fn="adamerging"``: the initial λ from the second iteration on (FusionBench's 1e-8).
        ada_lr: ``merge_fn="adamerging"``: Adam's learning rate (1e-3, fixed in FusionBench).
        ada_data: ``merge_fn="adamerging"``: ``{task: iterable of batches}`` (unlabelled; labels are ignored) whose
            next batch per task each Adam step reads, each iterable restarted when it ends (FusionBench: a shuffled
            loader of 16 test images per task, without end). Moved to the module's device. None: every Adam step
            reads the iteration's own batches.

    Raises:
        ValueError: a bad ``mode``, ``merge_fn`` (or one the mode lacks), ``granularity``, ``iterations``,
            ``step_size``, ``scaling_factor``, ``init``, ``loss``, ``density``, ``ada_iters``, ``ada_coeff``,
            ``ada_lr`` or ``ada_data`` (a number that is not finite, or a boolean, included); or what
            :class:`~lightning_merge.tools.adamerging.AdaMerging` refuses (no experts, an expert lacking a merged
            tensor, nothing to merge).
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Any],
        base: Any,
        *,
        mode: Literal["hard", "soft"] = "hard",
        merge_fn: Literal["task_arithmetic", "ties", "adamerging"] = "task_arithmetic",
        granularity: Literal["task", "layer"] = "task",
        iterations: int = 10,
        step_size: float = 0.1,
        scaling_factor: float = 0.3,
        init: Literal["task_arithmetic", "base", "ties"] | None = None,
        loss: Literal["cross_entropy", "entropy"] = "cross_entropy",
        logits_fn: Callable[[FWMerging, Any, Any], Any] | None = None,
        include: str | None = None,
        density: float = 0.2,
        ada_iters: int = 500,
        ada_coeff: float = 1e-8,
        ada_lr: float = 1e-3,
        ada_data: Mapping[Any, Iterable[Any]] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"FWMerging: mode must be 'hard' or 'soft', got {mode!r}")
        if merge_fn not in STEPS[mode]:
            raise ValueError(f"FWMerging: merge_fn must be one of {STEPS[mode]} in {mode} mode (FusionBench's), got "
                             f"{merge_fn!r}")
        if granularity not in ("task", "layer"):
            raise ValueError(f"FWMerging: granularity must be 'task' or 'layer', got {granularity!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ValueError(f"FWMerging: iterations must be an integer >= 1, got {iterations!r}")
        for argument, value in (("step_size", step_size), ("scaling_factor", scaling_factor), ("ada_coeff", ada_coeff),
                                ("ada_lr", ada_lr), ("density", density)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"FWMerging: {argument} must be a finite number, got {value!r}")
        if not step_size > 0:
            raise ValueError(f"FWMerging: step_size must be > 0, got {step_size!r}")
        if not scaling_factor > 0:
            raise ValueError(f"FWMerging: scaling_factor must be > 0, got {scaling_factor!r}")
        if init is None:
            init = "base" if mode == "soft" else ("ties" if merge_fn == "ties" else "task_arithmetic")
        starts = ("task_arithmetic", "base", "ties") if merge_fn == "ties" else ("task_arithmetic", "base")
        if init not in starts:
            raise ValueError(f"FWMerging: init must be 'task_arithmetic' or 'base' (or 'ties' with merge_fn='ties'), "
                             f"got {init!r}")
        if loss not in ("cross_entropy", "entropy"):
            raise ValueError(f"FWMerging: loss must be 'cross_entropy' or 'entropy', got {loss!r}")
        if not 0 < density <= 1:
            raise ValueError(f"FWMerging: density must be in (0, 1], got {density!r}")
        if isinstance(ada_iters, bool) or not isinstance(ada_iters, numbers.Integral) or ada_iters < 0:
            raise ValueError(f"FWMerging: ada_iters must be an integer >= 0, got {ada_iters!r}")
        if not ada_lr > 0:
            raise ValueError(f"FWMerging: ada_lr must be > 0, got {ada_lr!r}")
        if ada_data is not None and (not isinstance(ada_data, Mapping) or not ada_data):
            raise ValueError("FWMerging: ada_data must be a non-empty mapping {task: iterable of batches}")
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
        self.merge_fn = merge_fn
        self.granularity = granularity
        self.iterations = iterations
        self.step_size = float(step_size)
        self.scaling_factor = float(scaling_factor)
        self.init = init
        self.loss = loss
        self.logits_fn = logits_fn
        self.density = float(density)
        self.ada_iters = ada_iters
        self.ada_coeff = float(ada_coeff)
        self.ada_lr = float(ada_lr)
        self.ada_data = ada_data
        self._ada_iterators: dict[Any, Iterator[Any]] = {}
        if init == "task_arithmetic":
            self.merger.lambdas.data.fill_(self.scaling_factor)
        self.register_buffer("initial", self.merger.lambdas.detach().clone())
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # the base's merged tensors (coefficients of 0 add nothing: no merged model is built), and their shapes
        base_weights = self.merger.merged_parameters(torch.zeros_like(self.initial))
        self.shapes = {n: tuple(t.shape) for n, t in base_weights.items()}
        if merge_fn == "ties":
            # the iterate and the initial merged model as weights (flat, in the order of names): the per-entry trims
            # leave the coefficient form
            if init == "ties":
                # the experts' weights θ₀ + τₖ built tensor by tensor as the merge reads them, not N models at once
                experts_weights = [_VertexWeights(self, v) for v in self.vertices()[:self.experts_count]]
                start = self.ties_step(experts_weights, base_weights, self.scaling_factor)
            else:
                start = self.merger.merged_parameters(self.initial)
            flat = torch.cat([start[n].detach().reshape(-1) for n in self.names])
            del start
            self.register_buffer("point", flat)
            self.register_buffer("initial_point", flat.clone())
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
        """The current coefficients C (experts × merged tensors): θ = θ₀ + Σₖ Cₖ,ₗ τₖ.

        Raises:
            ValueError: ``merge_fn="ties"``, whose iterates have no such coefficients.
        """
        self._check_layerwise("coefficient_matrix")
        return self.merger.lambdas.detach().clone()

    def merged_parameters(self) -> dict[str, Tensor]:
        """The current merged tensors (θ₀ + Σₖ Cₖ,ₗ τₖ, or the TIES iterate), without gradient."""
        if self.merge_fn == "ties":
            return self._unflatten(self.point)
        with torch.no_grad():
            return {n: t.detach() for n, t in self.merger.merged_parameters().items()}

    def merged_state(self) -> dict[str, Tensor]:
        """The merged model's state dict: the merged tensors (float32) and the base's other tensors; what
        ``merge(experts, base, fw.strategy())`` writes, and with ``merge_fn="ties"`` the only form of the result
        (write it with ``merge([fw.merged_state()], base, Linear(), out=..., dtype=...)``, the base's dtype: a folder
        with the base folder's config.json, loadable as the base is; without the base, float32 tensors and no
        config)."""
        return {**self.merger.other_tensors(), **{n: t.clone() for n, t in self.merged_parameters().items()}}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The merged model called on ``args`` / ``kwargs`` (during a gradient, at the point it is taken)."""
        point = self._point if self._point is not None else self.merged_parameters()
        return self.merger.call_with(point, *args, **kwargs)

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """The merged tensors of a flat vector in the order of :attr:`names` (views of it)."""
        out, start = {}, 0
        for n, shape in self.shapes.items():
            size = math.prod(shape)
            out[n] = flat[start:start + size].view(shape)
            start += size
        return out

    def _check_layerwise(self, what: str) -> None:
        if self.merge_fn == "ties":
            raise ValueError(f"FWMerging.{what}: merge_fn='ties' trims each step per entry, so the merged model is not "
                             "θ₀ + Σₖ Cₖ,ₗ τₖ with one coefficient per expert and tensor; take fw.merged_state() and "
                             "write it with merge([fw.merged_state()], base, Linear(), out=..., "
                             "dtype=<the base's dtype>)")

    # -- one Frank–Wolfe iteration ------------------------------------------------------------------------------------
    def task_loss(self, task: Any, batch: Any, loss: str | None = None) -> Tensor:
        """The loss of the merged model on one task's ``batch`` (``loss``: cross-entropy or entropy; None: the
        module's ``loss``).

        Raises:
            ValueError: cross-entropy and the batch carries no labels.
        """
        output = self.logits_fn(self, task, batch) if self.logits_fn is not None else call_on_batch(self, batch)
        logits = logits_of(output, "pass FWMerging(logits_fn=...)")
        if (loss or self.loss) == "entropy":
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

    def vertex_weights(self, vertices: Tensor, v: int) -> dict[str, Tensor]:
        """The weights of vertex ``v`` of the pool (``vertices`` as :meth:`vertices` returns them): θ₀ + Σₖ sₖ,ₗ τₖ,
        and with ``merge_fn="ties"`` the initial TIES merge for the initial merged model (hard mode's last vertex)."""
        if self.merge_fn == "ties" and v == self.experts_count:
            return self._unflatten(self.initial_point)
        return self.merger.merged_parameters(vertices[v])

    def alignments(self, gradients: Mapping[str, Tensor], vertices: Tensor) -> Tensor:
        """cos(gₗ, sₗ) for every vertex s (coefficients, as :meth:`vertices`) and merged tensor l: (V, tensors).

        sₗ is the vertex's weight (:meth:`vertex_weights`). A zero gradient or weight counts 0 (FusionBench divides
        by zero there, gets NaN and never picks that checkpoint, or fails when every one is NaN)."""
        out = torch.zeros(vertices.shape[0], len(self.names), dtype=torch.float64)
        for v in range(vertices.shape[0]):
            weights = self.vertex_weights(vertices, v)
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
            if self.merge_fn == "ties":
                picks = chosen if isinstance(chosen, dict) else dict.fromkeys(self.names, chosen)
                taken: dict[str, Tensor] = {}
                for v in dict.fromkeys(picks.values()):  # each chosen vertex built once, one at a time
                    vertex = self.vertex_weights(pool, v)
                    taken.update({n: vertex[n] for n, u in picks.items() if u == v})
                weights = {n: taken[n] for n in picks}
                moved = self.ties_step([weights], self.merged_parameters(), gamma)
                self.point.copy_(torch.cat([moved[n].reshape(-1) for n in self.names]))
            else:
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
            if self.merge_fn == "adamerging":
                lambdas = self.adamerging_step(targets, batches, self.scaling_factor if t == 0 else self.ada_coeff)
                c.add_(sum(lambdas[j][None, :].to(c) * (target - c) for j, target in enumerate(targets)))
            else:
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

    # -- the TIES and AdaMerging steps -------------------------------------------------------------------------------
    def ties_density(self) -> float:
        """The density handed to :class:`~lightning_merge.Ties` for it to keep ⌊d · density⌋ + 1 of the d merged
        entries (FusionBench's count; Ties keeps ⌊d · density⌋)."""
        d = sum(math.prod(shape) for shape in self.shapes.values())
        k = min(d, math.floor(d * self.density) + 1)
        value = k / d
        while keep_count(value, d) < k:  # k / d · d may round below k
            value = math.nextafter(value, 2.0)
        return min(value, 1.0)

    def ties_step(self, checkpoints: Sequence[Mapping[str, Tensor]], point: Mapping[str, Tensor],
                  scale: float) -> dict[str, Tensor]:
        """TIES-merging of ``checkpoints`` over ``point``: point + scale · Σ_agreeing trim(sⱼ − point), each sⱼ − point
        trimmed to its top entries over all merged tensors (:meth:`ties_density`), signs elected on the sum of the
        trimmed vectors, the agreeing entries summed (FusionBench's ``ties_merge`` with ``merge_func="sum"``): the
        project's :class:`~lightning_merge.Ties` through :func:`~lightning_merge.merge`. One checkpoint: point +
        scale · trim(s − point). A checkpoint may be an :class:`~lightning_merge.Expert` (read tensor by tensor)."""
        strategy = Ties(density=self.ties_density(), topk="model", normalize=False, scale=float(scale))
        # merged on the CPU (the engine reads its inputs there), moved back to the iterate's device
        merged = merge([w if isinstance(w, Expert) else {n: w[n].detach().cpu() for n in self.names}
                        for w in checkpoints],
                       {n: point[n].detach().cpu() for n in self.names}, strategy, progress=False)
        return {n: merged[n].to(point[n].device) for n in self.names}

    def adamerging_step(self, targets: Sequence[Tensor], batches: Mapping[Any, Any], init: float) -> Tensor:
        """λ (len(targets) × merged tensors) learned by :class:`~lightning_merge.tools.adamerging.AdaMerging` with
        the current merged model as its base and the chosen checkpoints (coefficients, as :meth:`vertices`) as its
        experts: ``ada_iters`` Adam steps from λ = ``init`` on the summed entropy of every task's predictions, on
        ``ada_data``'s next batches (or ``batches``); under DDP the λ gradient is averaged over the processes."""
        def cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:  # AdaMerging reads its experts on the CPU
            return {n: t.detach().cpu() for n, t in tensors.items()}

        names = "^(?:" + "|".join(re.escape(n) for n in self.names) + ")$"
        ada = AdaMerging(self.merger.model, [cpu(self.merger.merged_parameters(target)) for target in targets],
                         cpu({**self.merger.other_tensors(), **self.merged_parameters()}), granularity="tensor",
                         init=init, lr=self.ada_lr, include=names)
        ada.to(self.device)
        optimizer = ada.configure_optimizers()
        for _ in range(self.ada_iters):
            with torch.enable_grad():
                self._point = ada.merged_parameters()
                try:
                    total = sum(self.task_loss(task, batch, loss="entropy")
                                for task, batch in self._ada_batches(batches).items())
                finally:
                    self._point = None
                optimizer.zero_grad()
                total.backward()
            if self._trainer is not None:
                ada.lambdas.grad = self.trainer.strategy.reduce(ada.lambdas.grad, reduce_op="mean")
            optimizer.step()
        learned = ada.coefficients()
        return torch.tensor([learned[n] for n in self.names], dtype=torch.float64).T

    def _ada_batches(self, batches: Mapping[Any, Any]) -> Mapping[Any, Any]:
        """One batch per task for an AdaMerging step: ``ada_data``'s next (each iterable restarted when it ends),
        or the iteration's ``batches``."""
        if self.ada_data is None:
            return batches
        out = {}
        for task, source in self.ada_data.items():
            try:
                batch = next(self._ada_iterators[task])
            except (KeyError, StopIteration):
                self._ada_iterators[task] = iter(source)
                try:
                    batch = next(self._ada_iterators[task])
                except StopIteration:
                    raise ValueError(f"FWMerging: ada_data[{task!r}] holds no batch") from None
            out[task] = move_data_to_device(batch, self.device)
        return out

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
        """The current coefficients per merged tensor: ``{tensor: [C₁, …, C_N]}``.

        Raises:
            ValueError: ``merge_fn="ties"`` (:meth:`coefficient_matrix`).
        """
        self._check_layerwise("coefficients")
        return self.merger.coefficients()

    def strategy(self) -> LayerwiseTaskArithmetic:
        """The merged model as a :class:`~lightning_merge.LayerwiseTaskArithmetic` strategy: ``merge(experts, base,
        fw.strategy())`` writes the network this module computes (tensors not merged: the base's).

        Raises:
            ValueError: ``merge_fn="ties"``, whose result is no layer-wise task arithmetic (the module docstring):
                write :meth:`merged_state` instead.
        """
        self._check_layerwise("strategy")
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
