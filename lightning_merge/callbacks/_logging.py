"""Key numbers and figures of a merge, to every logger of the Trainer (rank 0; Lightning's loggers are rank-zero).

Numbers go through ``log_metrics``. Figures go through the logger's ``log_image`` where it has one (Weights & Biases,
Neptune...), TensorBoard's ``experiment.add_figure``, or as PNG files in the logger's folder otherwise (CSV)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def log_to_loggers(trainer: Any, prefix: str, metrics: Mapping[str, float], figures: Mapping[str, Any]) -> None:
    """Log ``metrics`` and ``figures`` (matplotlib) under ``prefix/`` at the current step, then close the figures."""
    loggers = list(getattr(trainer, "loggers", []) or [])
    step = int(getattr(trainer, "global_step", 0))
    try:
        for logger in loggers:
            if metrics:
                logger.log_metrics({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)
            for name, figure in figures.items():
                key = f"{prefix}/{name}"
                if callable(getattr(logger, "log_image", None)):
                    logger.log_image(key=key, images=[figure], step=step)
                elif callable(getattr(getattr(logger, "experiment", None), "add_figure", None)):
                    logger.experiment.add_figure(key, figure, global_step=step, close=False)
                elif getattr(logger, "log_dir", None):
                    folder = Path(logger.log_dir) / prefix
                    folder.mkdir(parents=True, exist_ok=True)
                    figure.savefig(folder / f"{name}-step{step}.png", dpi=100, bbox_inches="tight")
            logger.save()
    finally:
        if figures:
            import matplotlib.pyplot as plt

            for figure in figures.values():
                plt.close(figure)


def bars(values: Mapping[str, float], title: str, ylabel: str) -> Any:
    """A bar chart (matplotlib Figure) of labelled values."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(values), 3))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), [str(k)[-20:] for k in values], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


def report_summary(data: Mapping[str, Any]) -> dict[str, float]:
    """The key numbers of a :func:`lightning_merge.report`: mean pairwise cosine, overall sign conflicts, each
    expert's ‖τ‖, the merged ‖τ*‖."""
    import math

    n = len(data["experts"])
    cosine = data["cosine"]
    out = {"mean_cosine": (sum(sum(r) for r in cosine) - n) / max(n * (n - 1), 1)}
    blocks = data["blocks"].values()
    total = sum(b["numel"] for b in blocks)
    out["sign_conflict"] = sum(b["sign_conflict"] * b["numel"] for b in blocks) / max(total, 1)
    for i, name in enumerate(data["experts"]):
        out[f"task_vector_norm/{i}"] = math.sqrt(sum(b["norm"][i] ** 2 for b in blocks))
        del name
    merged = [b["merged_norm"] for b in blocks if "merged_norm" in b]
    if merged:
        out["merged_norm"] = math.sqrt(sum(m * m for m in merged))
    return out


__all__ = ["bars", "log_to_loggers", "report_summary"]
