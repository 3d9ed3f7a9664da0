"""Cost of adding one expert to a continual-merge state, for the 1st to the 20th expert of a ~100M-parameter model.

Each add runs in a fresh process (so its peak RSS is its own); experts are generated from seeds, written (with a
statistics sidecar for the curvature strategies), added, and deleted. Prints time and peak memory per add for each
strategy, the peak as a multiple of the model's bytes (raw, and above the process's baseline: Python, torch and
lightning_merge imported, measured in the same run), and draws docs/continual_cost.png.

    python benchmarks/continual_cost.py [--experts 10] [--params 100e6] [--strategies opcm linear fisher]
    python benchmarks/continual_cost.py --against ../old-checkout --strategies opcm --experts 3

``--against PATH`` adds every expert to a second state run by another checkout of lightning-merge (PATH holds its
``lightning_merge`` package), interleaved with this one's adds, and prints the two side by side with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from _child import run_measured  # noqa: E402

ADD = r"""
from lightning_merge import ContinualState
ContinualState(sys.argv[1]).add(sys.argv[2])
"""

CREATE = r"""
from lightning_merge import ContinualState
from lightning_merge.strategies import Strategy
ContinualState.create(sys.argv[1], base=sys.argv[2], strategy=Strategy.from_dict({"name": sys.argv[3]}))
"""


def layout(params: float) -> dict[str, tuple[int, int]]:
    """Square-ish linear layers (1024 × 1024) plus biases, adding up to about ``params``."""
    n = max(1, round(params / (1024 * 1024 + 1024)))
    shapes = {}
    for i in range(n):
        shapes[f"layers.{i}.weight"] = (1024, 1024)
        shapes[f"layers.{i}.bias"] = (1024,)
    return shapes


def write(path: Path, shapes: dict, seed: int, base: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g) * (0.02 if base is not None else 1.0)
        tensors[name] = base[name] + noise if base is not None else noise
    save_file(tensors, str(path))
    return tensors


BASELINE = r"""
import torch
from lightning_merge import ContinualState
"""


def write_sidecar(expert: Path, tensors: dict, seed: int) -> None:
    """A statistics sidecar next to ``expert``: positive random second moments and batch Fisher."""
    from lightning_merge.formats.sidecar import sidecar_path, write_statistics

    g = torch.Generator().manual_seed(seed)
    stats = {kind: {n: torch.rand(t.shape, generator=g) + 0.05 for n, t in tensors.items()}
             for kind in ("fisher.batch", "exp_avg_sq")}
    write_statistics(sidecar_path(expert), stats,
                     {"fisher.batch": {"count": 5, "batch_size": 4}, "exp_avg_sq": {"beta2": 0.999, "step": 100}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--strategies", nargs="+", default=["opcm", "linear", "task_arithmetic", "fisher", "ota"])
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "continual_cost.png"))
    parser.add_argument("--against", help="another lightning-merge checkout to measure side by side")
    args = parser.parse_args()
    against = str(Path(args.against).resolve()) if args.against else None
    if against and not (Path(against) / "lightning_merge" / "__init__.py").is_file():
        parser.error(f"--against {args.against}: no lightning_merge package there")
    shapes = layout(args.params)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    model_mb = total * 4 / 2**20
    baseline = min(run_measured(BASELINE)["peak_mb"] for _ in range(3))
    results: dict[str, list[dict]] = {}
    other: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = write(tmp / "base.safetensors", shapes, seed=0)
        for strategy in args.strategies:
            from lightning_merge import ContinualState
            from lightning_merge.strategies import Strategy

            state = tmp / f"state-{strategy}"
            ContinualState.create(state, base=tmp / "base.safetensors", strategy=Strategy.from_dict({"name": strategy}))
            results[strategy] = []
            other[strategy] = []
            if against:
                run_measured(CREATE, str(tmp / f"other-{strategy}"), str(tmp / "base.safetensors"), strategy,
                             code=against)
            for i in range(args.experts):
                expert = tmp / f"expert-{i}.safetensors"
                tensors = write(expert, shapes, seed=1000 + i, base=base)
                if strategy in ("fisher", "ota"):
                    write_sidecar(expert, tensors, seed=5000 + i)
                started = time.perf_counter()
                row = run_measured(ADD, str(state), str(expert))
                row["wall"] = time.perf_counter() - started
                results[strategy].append(row)
                if against:
                    other[strategy].append(run_measured(ADD, str(tmp / f"other-{strategy}"), str(expert), code=against))
                os.remove(expert)
                for sidecar in tmp.glob("expert-*.statistics.safetensors"):
                    os.remove(sidecar)
                theirs = (f"   (--against: {other[strategy][-1]['seconds']:6.2f} s  peak "
                          f"{other[strategy][-1]['peak_mb']:7.0f} MB)") if against else ""
                print(
                    f"{strategy:8s} expert {i + 1:2d}: {row['seconds']:6.2f} s  peak {row['peak_mb']:7.0f} MB{theirs}",
                    flush=True,
                )
    print(f"\nmodel: {total / 1e6:.0f}M parameters ({len(shapes) // 2} linear layers 1024×1024 + biases), float32, "
          f"{model_mb:.0f} MB; process baseline (imports) {baseline:.0f} MB")
    # The first add has no running merge yet (OPCM: no SVD), so compare the 2nd add with the later ones.
    print(f"{'strategy':16s}{'2nd add s':>10s}{'median 2..N':>13s}{'last add s':>12s}{'max MB':>9s}"
          f"{'× model':>9s}{'(− baseline) × model':>22s}")
    for strategy, rows in results.items():
        later = rows[1:] or rows
        median = sorted(r["seconds"] for r in later)[len(later) // 2]
        peak = max(r["peak_mb"] for r in rows)
        print(
            f"{strategy:16s}{later[0]['seconds']:10.2f}{median:13.2f}{rows[-1]['seconds']:12.2f}"
            f"{peak:9.0f}{peak / model_mb:9.2f}{(peak - baseline) / model_mb:22.2f}"
        )
    if against:
        print(f"\nside by side with {against} (median of adds 2..N; peak over all adds)")
        print(f"{'strategy':16s}{'this s':>9s}{'other s':>9s}{'ratio':>7s}{'this MB':>9s}{'other MB':>9s}{'ratio':>7s}")
        for strategy, rows in results.items():
            mine, theirs = rows[1:] or rows, other[strategy][1:] or other[strategy]
            a = statistics.median(r["seconds"] for r in mine)
            b = statistics.median(r["seconds"] for r in theirs)
            pa, pb = max(r["peak_mb"] for r in rows), max(r["peak_mb"] for r in other[strategy])
            print(f"{strategy:16s}{a:9.2f}{b:9.2f}{a / b:7.2f}{pa:9.0f}{pb:9.0f}{pa / pb:7.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for strategy, rows in results.items():
        xs = range(1, len(rows) + 1)
        ax1.plot(xs, [r["seconds"] for r in rows], marker="o", label=strategy)
        ax2.plot(xs, [r["peak_mb"] for r in rows], marker="o", label=strategy)
    ax1.set(xlabel="expert added", ylabel="seconds per add", ylim=(0, None), title="time per added expert")
    ax2.set(xlabel="expert added", ylabel="peak RSS (MB)", ylim=(0, None), title="peak memory per added expert")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"continual merging, {total / 1e6:.0f}M-parameter model (2-core CPU)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
