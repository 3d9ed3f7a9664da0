"""Wall time and per-rank peak memory of a merge split over 1, 2 and 4 processes (torch.distributed, gloo).

Uses the ~400M-parameter Llama family of merge_speed.py (bf16, 3 dense experts; built once in benchmarks/_work/).
For each process count, the merge runs in that many spawned processes (``lightning_merge.engine.distributed.spawn``, the
code path of ``lightning-merge merge --nproc N``), each rank reading and writing only its tensors. Prints the
median wall time (spawn and imports included), each rank's peak RSS (its own VmHWM), the ratios to one process,
and checks that every output is byte-identical to the one-process output.

    python benchmarks/distributed_merge.py [--runs 3] [--nproc 1 2 4] [--methods linear ties] [--small]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_speed import RECIPES, build, family_root  # noqa: E402


def _peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(rank: int, world_size: int, recipe: str, out: str, log: str) -> None:
    from lightning_merge.engine.run import merge
    from lightning_merge.tools.recipe import load_recipe

    started = time.perf_counter()
    loaded = load_recipe(recipe)
    merge(loaded.experts, loaded.base, loaded.strategy, out, dtype=loaded.dtype, group="world", progress=False)
    Path(log, f"rank-{rank}.json").write_text(json.dumps({"seconds": time.perf_counter() - started,
                                                          "peak_mb": _peak_mb()}))


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="*", default=["linear", "ties"], choices=list(RECIPES))
    parser.add_argument("--small", action="store_true", help="a ~20M model (quick check of the script)")
    args = parser.parse_args()

    from lightning_merge.engine.distributed import spawn

    root = family_root(args.small)
    base, experts = build(root, args.small)
    models_w = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"model: {model_bytes / 2**20:.0f} MB bf16 per model, 3 experts + base; {os.cpu_count()} CPUs; "
          f"median of {args.runs} runs")
    print(f"{'method':<8} {'procs':>5} {'wall s':>8} {'× 1 proc':>9} {'peak MB per rank':>24} {'max × 1 proc':>13}"
          f" {'identical':>10}")
    with tempfile.TemporaryDirectory(prefix="lm-dist-", dir=HERE / "_work") as tmp:
        for method in args.methods:
            recipe = Path(tmp, f"{method}.yaml")
            recipe.write_text(RECIPES[method].format(base=base, models_w=models_w))
            reference = None
            one_wall = one_peak = None
            for n in args.nproc:
                walls, peaks = [], []
                same = True
                for _ in range(args.runs):
                    out, log = Path(tmp, f"out-{method}-{n}"), Path(tmp, f"log-{method}-{n}")
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(log, ignore_errors=True)
                    log.mkdir()
                    started = time.perf_counter()
                    spawn(n, worker, (str(recipe), str(out), str(log)))
                    walls.append(time.perf_counter() - started)
                    ranks = [json.loads(Path(log, f"rank-{r}.json").read_text()) for r in range(n)]
                    peaks.append([r["peak_mb"] for r in ranks])
                    d = digest(out)
                    reference = reference or d
                    same = same and d == reference
                wall = statistics.median(walls)
                per_rank = [statistics.median(p[r] for p in peaks) for r in range(n)]
                if n == args.nproc[0]:
                    one_wall, one_peak = wall, max(per_rank)
                ranks_text = " ".join(f"{p:.0f}" for p in per_rank)
                print(f"{method:<8} {n:>5} {wall:>8.1f} {wall / one_wall:>9.2f} {ranks_text:>24} "
                      f"{max(per_rank) / one_peak:>13.2f} {'yes' if same else 'NO':>10}", flush=True)


if __name__ == "__main__":
    main()
