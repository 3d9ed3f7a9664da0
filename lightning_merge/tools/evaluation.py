"""Evaluate merged models the way the merging literature reports them, and tune the scale λ on validation data.

- :func:`evaluate`: a score per task (torchmetrics accuracy by default) from each task's dataloader.
- :class:`MergeReport`: per-task scores of several models, each expert's own score, and the **normalized score**
  (merged ÷ expert on each task, averaged over tasks), printed as a table and available as data.
- :func:`sweep_scale`: merge once at λ = 1, then evaluate θ₀ + λ·τ* for each λ of a grid (every task-vector
  strategy has this form, so one merge serves the whole sweep) and return the best.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.capture.fisher import default_logits_fn
from lightning_merge.files.finite import cast_checked

DEFAULT_SCALES = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)


@torch.no_grad()
def evaluate(
    model: nn.Module | Mapping[str, nn.Module],
    loaders: Mapping[str, Iterable[Any]],
    *,
    metric: str | Callable[[int], Any] = "accuracy",
    logits_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Score ``model`` on each task's dataloader.

    Args:
        model: one module for every task, or ``{task: module}`` (for example a merged backbone with each task's
            own head).
        loaders: ``{task: dataloader}``; batches are read as in :mod:`lightning_merge.capture.fisher` (the module's
            ``fisher_logits(batch)``, else ``(x, y)`` or a mapping with ``"labels"``).
        metric: ``"accuracy"`` (torchmetrics ``MulticlassAccuracy``, micro average, targets −100 ignored), or a
            factory ``num_classes -> torchmetrics.Metric``.
        logits_fn: overrides how ``(module, batch)`` becomes ``(logits, targets)``.

    Returns:
        ``{task: score}`` as floats.
    """
    from torchmetrics.classification import MulticlassAccuracy

    scores: dict[str, float] = {}
    for task, loader in loaders.items():
        if isinstance(model, Mapping) and task not in model:
            raise KeyError(f"no model for task '{task}' (models are given for: {', '.join(model)})")
        module = model[task] if isinstance(model, Mapping) else model
        was_training = module.training
        module.eval()
        get = (lambda batch, m=module: logits_fn(m, batch)) if logits_fn else default_logits_fn(module)
        state = None
        try:
            for batch in loader:
                logits, targets = get(batch)
                logits = logits.reshape(-1, logits.shape[-1]).float()
                targets = targets.reshape(-1)
                if state is None:
                    classes = logits.shape[-1]
                    state = (
                        MulticlassAccuracy(num_classes=classes, average="micro", ignore_index=-100)
                        if metric == "accuracy"
                        else metric(classes)
                    )
                state.update(logits, targets)
        finally:
            module.train(was_training)
        if state is None:
            raise ValueError(f"the dataloader of task '{task}' yielded no batches")
        scores[task] = float(state.compute())
    return scores


def normalized_score(scores: Mapping[str, float], expert_scores: Mapping[str, float]) -> float:
    """Mean over tasks of ``scores[task] / expert_scores[task]`` (the merging literature's normalized accuracy)."""
    missing = [t for t in expert_scores if t not in scores]
    if missing:
        raise KeyError(f"no score for task(s) {', '.join(missing)}")
    ratios = [scores[t] / expert_scores[t] if expert_scores[t] else float("nan") for t in expert_scores]
    return sum(ratios) / len(ratios)


@dataclasses.dataclass
class MergeReport:
    """Scores of several models on several tasks, against each expert's own score.

    Attributes:
        expert_scores: ``{task: score of the expert fine-tuned on that task}``.
        rows: ``{model name: {task: score}}`` in insertion order.
        scales: ``{model name: λ chosen}`` where a sweep chose one.
    """

    expert_scores: dict[str, float]
    rows: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    scales: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.expert_scores)

    def add(self, name: str, scores: Mapping[str, float], scale: float | None = None) -> None:
        """Record a model's per-task scores (and the λ it used)."""
        self.rows[name] = dict(scores)
        self.scales[name] = scale

    def normalized(self, name: str) -> float:
        return normalized_score(self.rows[name], self.expert_scores)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{model: {task: score, ..., "normalized": x, "scale": λ}}``, experts first."""
        out = {"experts (own task)": {**self.expert_scores, "normalized": 1.0, "scale": None}}
        for name, scores in self.rows.items():
            out[name] = {**scores, "normalized": self.normalized(name), "scale": self.scales.get(name)}
        return out

    def table(self, percent: bool = True) -> str:
        """The table as text: one row per model, a column per task, the normalized score and λ."""
        rows = self.as_dict()
        width = max(len(k) for k in rows) + 2
        cell = max(12, max(len(t) for t in self.tasks) + 2)
        header = f"{'method':<{width}}" + "".join(f"{t:>{cell}}" for t in self.tasks) + f"{'normalized':>12}{'λ':>6}"
        lines = [header, "-" * len(header)]
        fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.4f}")
        for name, row in rows.items():
            cells = "".join(f"{fmt(row[t]):>{cell}}" for t in self.tasks)
            scale = "" if row["scale"] is None else f"{row['scale']:g}"
            lines.append(f"{name:<{width}}{cells}{fmt(row['normalized']):>12}{scale:>6}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, ax: Any = None) -> Any:
        """Per-task scores of every model as grouped bars, with the normalized score in the legend (a matplotlib
        Figure; draws on ``ax`` if given)."""
        import numpy as np

        fig, ax = _axes(ax, size=(1.5 + 1.6 * len(self.tasks), 3.5))
        rows = self.as_dict()
        width = 0.8 / max(len(rows), 1)
        x = np.arange(len(self.tasks))
        for i, (name, row) in enumerate(rows.items()):
            ax.bar(x + i * width, [row[t] for t in self.tasks], width,
                   label=f"{name} ({100 * row['normalized']:.1f}%)")
        ax.set_xticks(x + 0.4 - width / 2, self.tasks, fontsize=8)
        ax.set_ylabel("score")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("per-task scores (normalized in parentheses)", fontsize=10)
        return fig


@dataclasses.dataclass
class SweepResult:
    """The outcome of :func:`sweep_scale`.

    Attributes:
        scale: the best λ.
        score: its validation score.
        scores: ``{λ: score}`` for the whole grid.
        state: the merged state dict at the best λ.
        strategy: the strategy with ``scale`` set to the best λ.
    """

    scale: float
    score: float
    scores: dict[float, float]
    state: dict[str, Tensor]
    strategy: Any

    def plot(self, ax: Any = None, label: str | None = None) -> Any:
        """The validation score against λ, the best marked (a matplotlib Figure; draws on ``ax`` if given)."""
        fig, ax = _axes(ax)
        xs = sorted(self.scores)
        ax.plot(xs, [self.scores[x] for x in xs], marker="o", label=label or getattr(self.strategy, "name", None))
        ax.axvline(self.scale, ls=":", color="grey")
        ax.set_xlabel("λ (scale)")
        ax.set_ylabel("validation score")
        ax.set_title(f"best λ = {self.scale:g}", fontsize=10)
        return fig


def _axes(ax: Any = None, size: tuple[float, float] = (6, 3)) -> tuple[Any, Any]:
    import matplotlib

    if ax is not None:
        return ax.figure, ax
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def scale_task_vector(merged_at_1: Mapping[str, Tensor], base: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """θ₀ + λ·(θ(1) − θ₀) for floating tensors (others as merged)."""
    out = {}
    for name, value in merged_at_1.items():
        if value.is_floating_point() and name in base:
            b = base[name].to(torch.float32)
            out[name] = (b + scale * (value.to(torch.float32) - b)).to(value.dtype)
        else:
            out[name] = value
    return out


def sweep_scale(
    strategy: Any,
    experts: Sequence[Any],
    base: Any,
    score: Callable[[dict[str, Tensor]], float],
    scales: Sequence[float] = DEFAULT_SCALES,
    **merge_kwargs: Any,
) -> SweepResult:
    """Choose the scale λ of a task-vector strategy on validation data.

    The merge runs once, at λ = 1, in float32; each λ of the grid is then θ₀ + λ·τ*, which is exactly what the
    strategy gives at that scale (every strategy with ``scalable`` set has this form), rounded once to the base's
    dtype, so ``result.state`` equals ``merge(..., strategy=result.strategy)``.

    Args:
        strategy: a strategy with a ``scale`` argument (TaskArithmetic, Ties, Fisher, OTA...).
        experts: as for :func:`lightning_merge.merge`.
        base: the base (a path, an ``Expert`` or a state dict); required.
        score: ``state dict -> float``, higher is better (for example the normalized validation accuracy).
        scales: the grid.
        merge_kwargs: passed to :func:`lightning_merge.merge` (``include``, ``on_missing_statistic``...).

    Returns:
        A :class:`SweepResult`.
    """
    from lightning_merge.engine.run import merge, parse_dtype
    from lightning_merge.sources.expert import as_expert

    if not getattr(strategy, "scalable", False) or not any(f.name == "scale" for f in dataclasses.fields(strategy)):
        raise ValueError(
            f"{type(strategy).__name__} has no scale λ of the form θ₀ + λ·τ* to sweep (LiNeS: sweep its alpha and "
            "beta by merging at each value)"
        )
    if base is None:
        raise ValueError("sweep_scale needs a base model (θ = θ₀ + λ·τ)")
    if not scales:
        raise ValueError("scales is empty")
    for s in scales:  # each λ is the strategy's scale, validated as the strategy would validate it
        dataclasses.replace(strategy, scale=s)
    out_dtype = parse_dtype(merge_kwargs.pop("dtype", None))
    if "out" in merge_kwargs or "output" in merge_kwargs:
        raise ValueError("sweep_scale returns state dicts: it takes no out= or output=")
    base_expert = as_expert(base, "base")
    at_one = merge(experts, base=base_expert, strategy=dataclasses.replace(strategy, scale=1.0),
                   dtype=torch.float32, **merge_kwargs)
    dtypes = {name: out_dtype or (base_expert.spec(name).dtype if name in base_expert else value.dtype)
              for name, value in at_one.items()}
    base_state = {name: base_expert.tensor(name) for name in at_one if name in base_expert}

    def at(scale: float) -> dict[str, Tensor]:
        return {n: cast_checked(v, dtypes[n], n, "dtype= (or a smaller scale)")
                for n, v in scale_task_vector(at_one, base_state, scale).items()}

    results = {float(s): float(score(at(s))) for s in scales}
    best = max(results, key=lambda s: (results[s], -abs(s - 1.0)))
    return SweepResult(
        scale=best,
        score=results[best],
        scores=results,
        state=at(best),
        strategy=dataclasses.replace(strategy, scale=best),
    )


@dataclasses.dataclass
class GridSweep:
    """The outcome of :func:`sweep`.

    Attributes:
        arguments: the best combination of the swept arguments (with ``scale`` when λ was swept too).
        score: its validation score.
        results: every combination tried, as ``(arguments, score)`` in grid order.
        state: the merged state dict of the best combination.
        strategy: the strategy with the best arguments, for ``merge(..., out=...)`` on disk.
    """

    arguments: dict[str, Any]
    score: float
    results: list[tuple[dict[str, Any], float]]
    state: dict[str, Tensor]
    strategy: Any


def sweep(
    strategy: Any,
    experts: Sequence[Any],
    base: Any,
    score: Callable[[dict[str, Tensor]], float],
    grid: Mapping[str, Sequence[Any]],
    scales: Sequence[float] | None = DEFAULT_SCALES,
    **merge_kwargs: Any,
) -> GridSweep:
    """Choose several arguments of a strategy jointly on validation data (e.g. the weighted median's κ with λ).

    Every combination of ``grid`` is built as a strategy (so a bad value is refused before anything merges) and
    merged once; for a ``scalable`` strategy each combination's λ grid then comes from that one merge, as in
    :func:`sweep_scale`. ``result.state`` is the model ``merge`` gives with ``result.strategy``.

    Args:
        strategy: the strategy whose arguments are swept (its other arguments stay as given).
        experts: as for :func:`lightning_merge.merge`.
        base: the base (a path, an ``Expert`` or a state dict).
        score: ``state dict -> float``, higher is better. Ties go to the first combination in grid order (then
            to the λ nearest 1).
        grid: ``{argument: values}``, e.g. ``{"kappa": [0.5, 0.75, 1.0]}``; any argument of the strategy but
            ``scale``.
        scales: the λ grid swept for every combination when the strategy is scalable; None merges each
            combination at the strategy's own ``scale``. Strategies without a scale (LiNeS, OPCM, Linear) need
            None.
        merge_kwargs: passed to :func:`lightning_merge.merge`.

    Returns:
        A :class:`GridSweep`.
    """
    import itertools

    from lightning_merge.engine.run import merge

    name = type(strategy).__name__
    if not dataclasses.is_dataclass(strategy):
        raise ValueError(f"sweep needs a strategy object, got {strategy!r}")
    fields = {f.name for f in dataclasses.fields(strategy)}
    if not grid:
        raise ValueError("sweep: grid is empty; give {argument: values}, e.g. {'kappa': [0.5, 1.0]}")
    for key, values in grid.items():
        if key == "scale":
            raise ValueError("sweep: λ is swept by scales=, not in grid (one merge serves every λ)")
        if key not in fields:
            raise ValueError(f"sweep: {name} has no argument {key!r}; its arguments: {', '.join(sorted(fields))}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"sweep: grid[{key!r}] must be a non-empty list of values, got {values!r}")
    if scales is not None and not (getattr(strategy, "scalable", False) and "scale" in fields):
        raise ValueError(f"sweep: {name} has no scale λ to sweep; pass scales=None to merge each combination as is")
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    candidates = [dataclasses.replace(strategy, **combo) for combo in combos]  # every value checked up front
    results: list[tuple[dict[str, Any], float]] = []
    best: tuple[float, dict[str, Any], dict[str, Tensor], Any] | None = None
    for combo, candidate in zip(combos, candidates):
        if scales is not None:
            found = sweep_scale(candidate, experts, base, score, scales=scales, **merge_kwargs)
            for lam, value in found.scores.items():
                results.append(({**combo, "scale": lam}, value))
            chosen, value, state, final = {**combo, "scale": found.scale}, found.score, found.state, found.strategy
        else:
            state = merge(experts, base=base, strategy=candidate, **merge_kwargs)
            value = float(score(state))
            results.append((dict(combo), value))
            chosen, final = dict(combo), candidate
        if best is None or value > best[0]:
            best = (value, chosen, state, final)
    assert best is not None
    return GridSweep(arguments=best[1], score=best[0], results=results, state=best[2], strategy=best[3])


__all__ = ["GridSweep", "MergeReport", "SweepResult", "evaluate", "normalized_score", "scale_task_vector", "sweep",
           "sweep_scale"]
