"""Peak memory and wall time of `lightning-merge report` against `lightning-merge merge` on the same experts: the
report streams tensor by tensor like a merge, so its peak should stay within the merge's.

Uses the ~400M-parameter dense Llama family of merge_speed.py (built once in benchmarks/_work/, 3 bf16 experts),
the TIES strategy for both; each command in its own process, median of --runs runs.

    python benchmarks/report_memory.py [--runs 3] [--small]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from merge_speed import build, family_root, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a 20M-parameter family, for a quick check")
    args = parser.parse_args()
    root = family_root(args.small, "dense")
    base, experts = build(root, args.small)
    recipe = root / "report-ties.yaml"
    models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts)
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.3}}\nmodels:\n{models}\n")
    exe = str(Path(sys.executable).parent / "lightning-merge")
    results: dict[str, list[tuple[float, float]]] = {"merge": [], "report": []}
    for _ in range(args.runs):
        out = root / "out-merge"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = run_measured([exe, "merge", str(recipe), str(out), "--no-progress"])
        results["merge"].append((wall, rss))
        shutil.rmtree(out, ignore_errors=True)
        out = root / "out-report"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = run_measured([exe, "report", "--recipe", str(recipe), "--out", str(out), "--no-progress"])
        results["report"].append((wall, rss))
    print(f"{'command':<10}{'wall (s)':>12}{'peak RSS (MB)':>16}")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        medians[name] = (wall, rss)
        print(f"{name:<10}{wall:>12.1f}{rss:>16.0f}")
    print(f"report / merge: wall {medians['report'][0] / medians['merge'][0]:.2f}x, "
          f"peak memory {medians['report'][1] / medians['merge'][1]:.2f}x")


if __name__ == "__main__":
    main()
