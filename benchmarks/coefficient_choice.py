"""Task-arithmetic coefficients chosen from the captured Fisher, without evaluation data, on the digits benchmark.

For each seed: four digits experts trained with CurvatureCapture (as merge_quality.py), then
- test normalized accuracy of task arithmetic with λ* from ``quadratic_coefficients`` (no evaluation data; model-wide
  and per layer), against
  task arithmetic with one λ tuned on validation data, task arithmetic at λ = 1 (no data), and λ*'s per-expert
  ratios with one overall λ tuned on validation;
- how well the Fisher-quadratic model ranks real merges: Spearman's ρ between the predicted mean relative loss and
  the measured validation normalized accuracy over 30 coefficient vectors (the 8 uniform λ of the tuning grid and 22
  random ones in [0, 1.5]⁴), negated so that ρ = 1 is a perfect ranking.

    python benchmarks/coefficient_choice.py [--seeds 5] [--epochs 12] [--fisher example|true|exact]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_merge import TaskArithmetic, merge  # noqa: E402
from lightning_merge.cli.demo import train_digits_experts  # noqa: E402
from lightning_merge.tools.coefficients import quadratic_coefficients  # noqa: E402
from lightning_merge.tools.evaluation import normalized_score, sweep_scale  # noqa: E402

GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5)


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> torch.Tensor:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = torch.empty(len(v), dtype=torch.float64)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def run_seed(seed: int, epochs: int, fisher: str = "example") -> dict[str, float]:
    setup = train_digits_experts(seed=seed, epochs=epochs, verbose=False, fisher_after_fit=fisher)
    own_val, own_test = setup.own_scores("val"), setup.own_scores("test")

    def val(state):
        return normalized_score(setup.scores(state, "val"), own_val)

    def test(state):
        return normalized_score(setup.scores(state, "test"), own_test)

    n = len(setup.experts)
    choice = quadratic_coefficients(setup.experts, setup.base, per_block=True)
    tuned = sweep_scale(TaskArithmetic(), setup.experts, setup.base, val, GRID)
    rows = {
        "base (no merge)": test(setup.base),
        "task arithmetic, λ = 1 (no data)": test(merge(setup.experts, setup.base, TaskArithmetic())),
        "task arithmetic, λ tuned on validation": test(tuned.state),
        "Fisher-quadratic λ* (no data)": test(merge(setup.experts, setup.base, choice.strategy())),
        "Fisher-quadratic λ* per layer (no data)": test(merge(setup.experts, setup.base,
                                                              choice.strategy(per_block=True))),
    }
    # the per-expert ratios of λ* with one overall λ tuned on validation: do the ratios carry information?
    mean_w = sum(choice.weights) / n
    ratios = TaskArithmetic(weights=[w / mean_w for w in choice.weights])
    rows["λ* ratios, overall λ tuned on validation"] = test(sweep_scale(ratios, setup.experts, setup.base, val,
                                                                       GRID).state)
    g = torch.Generator().manual_seed(1000 + seed)
    vectors = [[lam] * n for lam in GRID] + [(torch.rand(n, generator=g) * 1.5).tolist() for _ in range(22)]
    predicted, measured = [], []
    for lam in vectors:
        predicted.append(-choice.predicted_mean(lam))
        measured.append(val(merge(setup.experts, setup.base, TaskArithmetic(weights=lam))))
    rows["spearman ρ (prediction vs validation accuracy)"] = spearman(predicted, measured)
    rows["λ* mean"] = sum(choice.weights) / n
    rows["λ tuned"] = tuned.scale
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--fisher", default="example", choices=["example", "true", "exact"],
                        help="the post-fit Fisher estimator the experts capture (the model reads it)")
    args = parser.parse_args()
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(seed, args.epochs, args.fisher))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[-1].items()), flush=True)
    print(f"\ndigits, {args.seeds} seeds, {args.fisher} Fisher (mean ± std; accuracies normalized ×100)")
    for key in per_seed[0]:
        values = [r[key] for r in per_seed]
        scale = 1 if "ρ" in key or key in ("λ* mean", "λ tuned") else 100
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:<50} {mean * scale:8.3f} ± {std * scale:.3f}")
    diffs = [r["Fisher-quadratic λ* (no data)"] - r["task arithmetic, λ tuned on validation"] for r in per_seed]
    wins = sum(d > 0 for d in diffs)
    print(f"  paired: λ* − tuned λ = {100 * statistics.mean(diffs):+.1f} ± {100 * statistics.stdev(diffs):.1f} points "
          f"(λ* ahead on {wins}/{len(diffs)} seeds)" if len(diffs) > 1 else "")


if __name__ == "__main__":
    main()
