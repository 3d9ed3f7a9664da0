"""Continual merging on the digits benchmark: normalized accuracy after each expert is folded in, for OPCM, DOP,
the continual average and continual Fisher, mean over seeds; a table and docs/continual_quality.png.

After expert t the merged backbone is evaluated on the t tasks seen so far (each with its expert's head), and
normalized by each expert's own accuracy, as in the OPCM paper.

    python benchmarks/continual_quality.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from lightning_merge import DOP, OPCM, ContinualState, Fisher, Linear
from lightning_merge.cli.demo import train_digits_experts
from lightning_merge.formats.sidecar import write_statistics
from lightning_merge.tools.evaluation import normalized_score

STRATEGIES = {"OPCM (α 0.5)": OPCM(alpha=0.5), "DOP (defaults)": DOP(), "continual average": Linear(),
              "continual Fisher": Fisher()}


def run(seed: int, folder: Path) -> dict[str, list[float]]:
    setup = train_digits_experts(seed=seed, verbose=False)
    save_file({k: v.contiguous() for k, v in setup.base.items()}, str(folder / "base.safetensors"))
    paths = []
    for t, expert in enumerate(setup.experts):
        path = folder / f"expert{t}.safetensors"
        save_file({k: v.contiguous() for k, v in setup.expert_state(t).items()}, str(path))
        per_kind: dict = {}
        for key in expert.statistics.keys():
            kind, name = key.split("/", 1)
            if name.startswith("backbone."):
                per_kind.setdefault(kind, {})[name[len("backbone.") :]] = expert.statistics._tensors[key]
        write_statistics(folder / f"expert{t}.statistics.safetensors", per_kind, expert.statistics.kinds)
        paths.append(path)
    own = setup.own_scores("test")
    out: dict[str, list[float]] = {}
    for label, strategy in STRATEGIES.items():
        state = ContinualState.create(folder / f"state-{label}", base=folder / "base.safetensors", strategy=strategy)
        curve = []
        for t, path in enumerate(paths):
            state.add(path)
            scores = setup.scores(state.state_dict(), "test")
            seen = [task.name for task in setup.tasks[: t + 1]]
            curve.append(normalized_score({k: scores[k] for k in seen}, {k: own[k] for k in seen}))
        out[label] = curve
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "continual_quality.png"))
    args = parser.parse_args()
    runs = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run(seed, Path(tmp)))
    steps = len(next(iter(runs[0].values())))
    print(f"digits, experts folded in one at a time, {args.seeds} seeds: normalized accuracy on the tasks seen so far")
    print(f"{'method':22s}" + "".join(f"{f'after {t + 1}':>16s}" for t in range(steps)))
    means = {}
    for label in STRATEGIES:
        cells, means[label] = [], []
        for t in range(steps):
            values = [100 * r[label][t] for r in runs]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            means[label].append(mean)
            cells.append(f"{mean:9.1f} ± {std:4.1f}")
        print(f"{label:22s}" + "".join(f"{c:>16s}" for c in cells))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, values in means.items():
        ax.plot(range(1, steps + 1), values, marker="o", label=label)
    ax.set(
        xlabel="experts folded in",
        ylabel="normalized accuracy (%)",
        title="continual merging on digits",
        xticks=range(1, steps + 1),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
