"""Merge quality on real data that ships offline: normalized accuracy of every strategy, λ chosen on validation.

Digits (scikit-learn): a backbone pre-trained briefly on 10-way digits; four experts fine-tuned with Lightning and
CurvatureCapture on different tasks (label functions and input transforms), each with its own head; backbones
merged; per-task accuracy with each expert's head; normalized = merged ÷ expert, averaged over tasks. Mean ± std
over seeds. Also: each statistics compression (float32, bfloat16, rank-1) through a real sidecar round trip.

    python benchmarks/merge_quality.py [--seeds 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lightning_merge import OTA, Breadcrumbs, Dare, Expert, Fisher, Linear, TaskArithmetic, Ties, WeightedMedian, merge
from lightning_merge.demo import train_digits_experts
from lightning_merge.evaluation import normalized_score, sweep_scale
from lightning_merge.stats import Statistics, write_statistics

GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5)


def strategies() -> dict[str, object]:
    return {
        "average": Linear(),
        "task_arithmetic": TaskArithmetic(),
        "ties (density 0.2)": Ties(density=0.2),
        "dare_ties (p 0.5)": Dare(drop_rate=0.5, combine="ties"),
        "breadcrumbs": Breadcrumbs(density=0.9, gamma=0.01),
        "fisher (batch)": Fisher(estimator="batch"),
        "fisher (per-example)": Fisher(estimator="example"),
        "fisher (batch, no norm)": Fisher(estimator="batch", normalize=False),
        "ota": OTA(),
        "ota + ffg (density 0.3)": OTA(density=0.3),
        "weighted_median (batch)": WeightedMedian(estimator="batch"),
    }


def recompressed(experts: list[Expert], compression: str, folder: Path) -> list[Expert]:
    """The same experts with statistics written to a sidecar under ``compression`` and read back."""
    out = []
    for i, expert in enumerate(experts):
        stats = expert.statistics
        per_kind: dict = {}
        for key in stats.keys():
            kind, name = key.split("/", 1)
            per_kind.setdefault(kind, {})[name] = stats._tensors[key]
        path = write_statistics(
            folder / f"{compression}-{i}.statistics.safetensors", per_kind, stats.kinds, compression=compression
        )
        state = {f"backbone.{n}": expert.tensor(n) for n in expert.names()}
        out.append(Expert(state, prefix="backbone.", statistics=Statistics.load(path), name=expert.name))
    return out


def run_seed(seed: int, epochs: int, folder: Path) -> dict[str, tuple[float, float | None]]:
    setup = train_digits_experts(seed=seed, epochs=epochs, verbose=False)
    own_val, own_test = setup.own_scores("val"), setup.own_scores("test")

    def val(state):
        return normalized_score(setup.scores(state, "val"), own_val)

    def test(state):
        return normalized_score(setup.scores(state, "test"), own_test)

    rows: dict[str, tuple[float, float | None]] = {"base (no merge)": (test(setup.base), None)}
    for name, strategy in strategies().items():
        if hasattr(strategy, "scale"):
            result = sweep_scale(strategy, setup.experts, setup.base, val, GRID)
            rows[name] = (test(result.state), result.scale)
        else:
            rows[name] = (test(merge(setup.experts, setup.base, strategy)), None)
    for compression in ("bfloat16", "rank1"):
        experts = recompressed(setup.experts, compression, folder)
        for name, strategy in (("fisher (batch)", Fisher(estimator="batch")), ("ota", OTA())):
            result = sweep_scale(strategy, experts, setup.base, val, GRID)
            rows[f"{name}, {compression} stats"] = (test(result.state), result.scale)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            per_seed.append(run_seed(seed, args.epochs, Path(tmp)))
    print(f"digits, 4 tasks, {args.seeds} seeds: normalized test accuracy (mean ± std), λ chosen on validation")
    print(f"{'method':34s}{'normalized':>18s}   λ per seed")
    for name in per_seed[0]:
        values = [100 * s[name][0] for s in per_seed]
        scales = [s[name][1] for s in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lam = "" if scales[0] is None else ", ".join(f"{x:g}" for x in scales)
        print(f"{name:34s}{statistics.mean(values):11.1f} ± {std:4.1f}   {lam}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
