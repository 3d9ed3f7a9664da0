"""Compute cost of each strategy's per-tensor rule, side by side: median time of ``merge_tensor`` on one
4096×4096 float32 tensor (16.8M entries) for 3 experts, and the ratio to task arithmetic (a weighted sum, the
floor). Reading and writing are the engine's and the same for every strategy; this isolates the rule itself.

    python benchmarks/strategy_cost.py [--size 4096] [--experts 3] [--runs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_merge import (
    OTA,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Expert,
    Fisher,
    Generalized,
    LiNeS,
    TaskArithmetic,
    Ties,
    WeightedMedian,
    prepare,
)


def strategies() -> dict[str, object]:
    return {
        "task_arithmetic": TaskArithmetic(),
        "ties (0.2)": Ties(density=0.2),
        "dare_ties (p 0.5)": Dare(drop_rate=0.5, combine="ties"),
        "breadcrumbs": Breadcrumbs(),
        "cabs 64:256": Cabs(),
        "consensus (TA, k 2)": Consensus(),
        "lines (ties, alpha given)": LiNeS(Ties(density=0.2), alpha=0.5),
        "generalized saliency + election": Generalized(sparsification="saliency", density=0.2, election="weighted"),
        "dare + fisher weights": Dare(drop_rate=0.5, weighting="fisher"),
        "fisher": Fisher(normalize=False),
        "ota + ffg (0.3)": OTA(density=0.3),
        "weighted_median": WeightedMedian(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, args.size, generator=g)
    tensors = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(args.experts)]
    stats = [{"fisher": torch.rand(base.shape, generator=g), "exp_avg_sq": torch.rand(base.shape, generator=g)}
             for _ in range(args.experts)]
    name = "layers.3.mlp.weight"
    experts = [
        Expert({name: t}, statistics={"fisher.batch": {name: st["fisher"]}, "exp_avg_sq": {name: st["exp_avg_sq"]}},
               name=f"expert{i}")
        for i, (t, st) in enumerate(zip(tensors, stats))
    ]
    times: dict[str, float] = {}
    for label, strategy in strategies().items():
        # the strategy's first pass (norms, LiNeS' α, model-wide thresholds), as merge() runs it; not timed
        prepared = prepare(experts, {name: base}, strategy)
        prepared.merge_tensor(name, base, tensors, stats)  # warm-up
        runs = []
        for _ in range(args.runs):
            started = time.perf_counter()
            prepared.merge_tensor(name, base, tensors, stats)
            runs.append(time.perf_counter() - started)
        times[label] = statistics.median(runs)
    floor = times["task_arithmetic"]
    print(f"{args.experts} experts of {args.size}×{args.size} float32, {args.threads} thread(s), median of "
          f"{args.runs}")
    print(f"{'strategy':34s}{'seconds':>9s}{'× task arithmetic':>20s}")
    for label, t in times.items():
        print(f"{label:34s}{t:9.3f}{t / floor:20.1f}")


if __name__ == "__main__":
    main()
