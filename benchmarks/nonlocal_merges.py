"""Non-local merges on digits: does the variance-collapse correction recover accuracy for experts fine-tuned far
from their base? And TALL masks as compression: storage against N full experts, each recovered expert's score.

Experts are the merge-quality benchmark's four digits experts (lightning_merge.cli.demo), trained twice: "local"
(Adam lr 1e-3, 12 epochs, the usual setting) and "far" (Adam lr 1e-2, 60 epochs: the backbones move far from
the base). Merges: task arithmetic and TIES with λ chosen on validation, and the plain average. Each is evaluated
as merged and with the per-task correction (``VarianceCorrection`` on both hidden Linear layers, calibrated on 256
training inputs per task; λ re-chosen with the correction on). Normalized test accuracy, mean ± std over seeds.

    python benchmarks/nonlocal_merges.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_merge import Linear, TaskArithmetic, Ties, merge, tall
from lightning_merge.cli.demo import accuracy, make_backbone, task_data, train_digits_experts
from lightning_merge.tools.evaluation import normalized_score, scale_task_vector
from lightning_merge.tools.variance import VarianceCorrection

GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
LAYERS = ["0", "2"]  # the backbone's two Linear layers (outputs before ReLU)


def backbone_of(state: dict) -> torch.nn.Module:
    module = make_backbone()
    module.load_state_dict(state)
    return module.eval()


def calibration(setup, n: int = 256) -> dict[str, list]:
    """Task name → a one-batch loader of that task's first ``n`` training inputs."""
    return {task.name: [(task_data(task, setup.splits["train"])[0][:n],)] for task in setup.tasks}


def scores(setup, state: dict, split: str, correction: VarianceCorrection | None = None) -> dict[str, float]:
    module = backbone_of(state)
    if correction is not None:
        correction.attach(module)
    out = {}
    for t, task in enumerate(setup.tasks):
        x, y = task_data(task, setup.splits[split])
        if correction is None:
            out[task.name] = accuracy(module, setup.heads[t], x, y)
        else:
            with correction.task(task.name):
                out[task.name] = accuracy(module, setup.heads[t], x, y)
    return out


def corrected(setup, state: dict) -> VarianceCorrection:
    experts = {task.name: backbone_of(setup.expert_state(t)) for t, task in enumerate(setup.tasks)}
    return VarianceCorrection.fit(backbone_of(state), experts, calibration(setup), layers=LAYERS)


def distance(setup) -> float:
    """Mean over experts of ‖τ‖ / ‖θ₀‖ over the backbone."""
    base_norm = torch.sqrt(sum(v.float().square().sum() for v in setup.base.values()))
    ratios = []
    for t in range(len(setup.tasks)):
        state = setup.expert_state(t)
        ratios.append(float(torch.sqrt(sum((state[k] - setup.base[k]).square().sum() for k in state)) / base_norm))
    return sum(ratios) / len(ratios)


def run_seed(seed: int, lr: float, epochs: int) -> tuple[dict[str, float], float]:
    setup = train_digits_experts(seed=seed, epochs=epochs, lr=lr, capture=False, verbose=False)
    own_val, own_test = setup.own_scores("val"), setup.own_scores("test")
    rows: dict[str, float] = {}
    for label, strategy in (("task arithmetic", TaskArithmetic()), ("ties (density 0.2)", Ties(density=0.2)),
                            ("average", Linear())):
        if isinstance(strategy, Linear):
            candidates = {1.0: merge(setup.experts, setup.base, strategy)}
        else:
            at_one = merge(setup.experts, setup.base, strategy)
            candidates = {s: scale_task_vector(at_one, setup.base, s) for s in GRID}
        plain = max(candidates, key=lambda s: normalized_score(scores(setup, candidates[s], "val"), own_val))
        rows[label] = normalized_score(scores(setup, candidates[plain], "test"), own_test)
        fixes = {s: corrected(setup, st) for s, st in candidates.items()}
        if label == "task arithmetic":  # the collapse itself: merged activation std over the expert's
            stats = [fixes[plain].stats[t][layer] for t in fixes[plain].stats for layer in LAYERS]
            ratio = torch.cat([(s["merged_var"] / s["expert_var"].clamp(min=1e-12)).sqrt() for s in stats])
            rows["σ_merged/σ_expert (TA, median)"] = float(ratio.median())
        best = max(candidates, key=lambda s: normalized_score(scores(setup, candidates[s], "val", fixes[s]), own_val))
        rows[f"{label} + correction"] = normalized_score(scores(setup, candidates[best], "test", fixes[best]),
                                                         own_test)
    return rows, distance(setup)


def tall_part(seed: int) -> None:
    """Compress the four local experts with TALL masks; storage and each recovered expert's own-task accuracy."""
    setup = train_digits_experts(seed=seed, capture=False, verbose=False)
    own = setup.own_scores("test")
    full = sum(v.numel() * v.element_size() for v in setup.base.values()) * len(setup.tasks)
    print(f"TALL compression of {len(setup.tasks)} digits experts (seed {seed}); full experts: {full / 1e3:.0f} kB")
    print(f"{'λ':>5s}{'stored kB':>11s}{'ratio':>8s}   recovered accuracy / expert accuracy per task (mask density)")
    with tempfile.TemporaryDirectory() as tmp:
        for lam in (0.2, 0.4, 0.6, 1.0):
            comp = tall.compress([setup.expert_state(t) for t in range(len(setup.tasks))], setup.base,
                                 Path(tmp) / f"tall-{lam}", tall_lambda=lam)
            size = comp.storage()["total"]
            densities = list(comp.density().values())
            cells = []
            for t, task in enumerate(setup.tasks):
                acc = scores(setup, comp.state_dict(t, setup.base), "test")[task.name]
                cells.append(f"{task.name} {100 * acc:.1f}/{100 * own[task.name]:.1f} ({densities[t]:.2f})")
            print(f"{lam:5.1f}{size / 1e3:11.0f}{size / full:8.3f}   " + "; ".join(cells))
        merged = merge(setup.experts, setup.base, TaskArithmetic())
        acc = scores(setup, merged, "test")
        print("  (task arithmetic λ=1 merged model, no masks: "
              + "; ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    settings = {"local (lr 1e-3, 12 epochs)": (1e-3, 12), "far (lr 1e-2, 60 epochs)": (1e-2, 60)}
    results = {}
    for label, (lr, epochs) in settings.items():
        runs = [run_seed(seed, lr, epochs) for seed in range(args.seeds)]
        results[label] = runs
    for label, runs in results.items():
        dist = statistics.mean(d for _, d in runs)
        print(f"{label}: ‖τ‖/‖θ₀‖ = {dist:.2f}; normalized test accuracy over {args.seeds} seeds")
        for name in runs[0][0]:
            factor = 1 if name.startswith("σ") else 100
            values = [factor * r[name] for r, _ in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 2 if factor == 1 else 1
            print(f"  {name:34s}{statistics.mean(values):7.{digits}f} ± {std:4.{digits}f}")
    print()
    tall_part(0)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
