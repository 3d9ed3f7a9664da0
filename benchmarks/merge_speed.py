"""Wall time and peak RSS of `lightning-merge merge` against `mergekit-yaml` on the same recipes.

Builds (once, in benchmarks/_work/) a base and 3 experts of a ~400M-parameter Llama-architecture model in bf16
safetensors (random weights), then runs both command lines on linear, task_arithmetic and ties (density 0.2)
recipes: whole-process wall time and peak RSS, median of --runs runs each, with ratios. Two families: "dense"
experts change every weight, as real fine-tunes do (the primary rows); "sparse" experts change 10 % of the entries
(TIES' top-20 % threshold is then zero and nothing is trimmed: a cheaper, less realistic case).
Also prints how far our merge is from the bandwidth floor (bytes read over the page-cache read bandwidth plus
bytes written over the fsync'd write bandwidth, both measured in the same run).

    python benchmarks/merge_speed.py --mergekit .venv-mergekit/bin/mergekit-yaml [--runs 3] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RECIPES = {
    "linear": "merge_method: linear\nmodels:\n{models_w}\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.5}}\n"
    "models:\n{models_w}\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.2}}\nmodels:\n{models_w}\n"
    "dtype: bfloat16\n",
    # mergekit's geometric and DELLA methods (issue 31): slerp between the base and the first expert
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n{models_first}\n"
    "dtype: bfloat16\n",
    "della": "merge_method: della\nbase_model: {base}\nparameters: {{density: 0.5, epsilon: 0.1}}\nmodels:\n"
    "{models_w}\ndtype: bfloat16\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n{models_plain}\ndtype: bfloat16\n",
}
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties"]


FAMILIES = {"dense": 1.0, "sparse": 0.1}  # the fraction of entries each expert changes


def family_root(small: bool, family: str = "dense") -> Path:
    return WORK / f"llama-{'small' if small else '400m'}-{family}"


def build(root: Path, small: bool, delta_density: float = 1.0) -> tuple[Path, list[Path]]:
    from lightning_merge.tools.testing import llama_config, write_llama_family

    config = (
        llama_config(hidden=256, layers=4, intermediate=704, vocab=8000, heads=8)
        if small
        else llama_config(hidden=1024, layers=26, intermediate=2816, vocab=32000, heads=16)
    )
    config = {**config, "_delta_density": delta_density}  # recorded in the marker only
    marker = root / "done.json"
    if marker.exists() and json.loads(marker.read_text()) == config:
        return root / "base", sorted(root.glob("expert_*"))
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    model_config = {k: v for k, v in config.items() if not k.startswith("_")}
    base, experts = write_llama_family(root, model_config, n_experts=3, delta_density=delta_density)
    marker.write_text(json.dumps(config))
    print(f"built the model family in {time.perf_counter() - started:.0f}s")
    return base, experts


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """Whole-process wall time (s) and peak RSS (MB) of ``cmd``, via /usr/bin/time, run in ``cwd``."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True, env=env,
                          cwd=cwd)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss = float(re.findall(r"MAXRSS (\d+)", proc.stderr)[-1]) / 1024
    return wall, rss, proc.stderr


def bandwidths(src_folder: Path, dst: Path) -> tuple[float, float]:
    """Read bandwidth (page cache into private memory) and fsync'd write bandwidth, bytes per second, measured by
    copying the base's weights: the floor of any merge that reads R and durably writes W bytes is
    R / read + W / write."""
    files = sorted(src_folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    chunks = []
    started = time.perf_counter()
    for f in files:
        with open(f, "rb") as src:
            while True:
                block = src.read(64 << 20)
                if not block:
                    break
                chunks.append(block)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    with open(dst, "wb") as out:
        for block in chunks:
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    write_s = time.perf_counter() - started
    dst.unlink()
    return total / read_s, total / write_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml") or ".venv-mergekit/bin/mergekit-yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a ~20M model (quick check of the script)")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(RECIPES))
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=None, help="pass --threads to lightning-merge")
    parser.add_argument("--against", type=Path, default=None,
                        help="another lightning-merge checkout, run interleaved with this one (side by side)")
    args = parser.parse_args()
    against_env = {**os.environ, "PYTHONPATH": str(args.against.resolve())} if args.against else None

    ours_cmd = [sys.executable, "-m", "lightning_merge.cli.commands"]
    have_mergekit = Path(args.mergekit).exists()
    if not have_mergekit:
        print(f"mergekit not found at {args.mergekit}: measuring lightning-merge only")
    startup = statistics.median(run_measured([sys.executable, "-c", "import lightning_merge.cli.commands"])[0]
                                for _ in range(max(3, args.runs)))
    torch_startup = statistics.median(run_measured([sys.executable, "-c", "import torch"])[0]
                                      for _ in range(max(3, args.runs)))
    print(f"start-up: import torch {torch_startup:.2f}s, import lightning_merge.cli.commands {startup:.2f}s")

    rows = []
    for family in args.families:
        base, experts = build(family_root(args.small, family), args.small, FAMILIES[family])
        model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        n_params = model_bytes // 2
        print(f"{family}: {n_params / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB bf16 per model, 3 experts "
              f"changing {FAMILIES[family]:.0%} of the entries")
        for folder in [base, *experts]:  # warm the page cache for both tools alike
            for f in folder.glob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        read_bw, write_bw = bandwidths(base, WORK / "copy.tmp")
        print(f"measured bandwidth: read {read_bw / 1e9:.2f} GB/s (page cache), "
              f"write {write_bw / 1e9:.2f} GB/s (fsync'd)")
        for method in args.methods:
            models_w = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts)
            recipe = WORK / f"{method}-{family}.yaml"
            recipe.write_text(RECIPES[method].format(
                base=base, models_w=models_w, models_plain="\n".join(f"  - model: {e}" for e in experts),
                models_first=f"  - model: {experts[0]}"))
            out = WORK / f"out-{method}"
            ours, theirs, merge_times, againsts = [], [], [], []
            for _ in range(args.runs):
                extra = ["--threads", str(args.threads)] if args.threads else []
                command = [*ours_cmd, "merge", str(recipe), str(out), "--overwrite", "--no-progress", *extra]
                wall, rss, err = run_measured(command, cwd=HERE.parent)
                ours.append((wall, rss))
                merge_times.append(float(re.findall(r"in ([\d.]+)s", err)[-1]))
                if against_env is not None:
                    # run in that checkout: ``python -m`` puts the working directory first on sys.path, before
                    # PYTHONPATH, so from this checkout's root it would import this checkout's package
                    wall, rss, _ = run_measured(command, env=against_env, cwd=args.against.resolve())
                    againsts.append((wall, rss))
                if have_mergekit:
                    shutil.rmtree(WORK / "out-mergekit", ignore_errors=True)
                    theirs.append(
                        run_measured([args.mergekit, str(recipe), str(WORK / "out-mergekit"), "--quiet"])[:2]
                    )
            read = model_bytes * {"linear": 3, "slerp": 2}.get(method, 4)  # what each method reads
            floor = read / read_bw + model_bytes / write_bw
            row = {
                "family": family,
                "method": method,
                "ours_s": statistics.median(w for w, _ in ours),
                "ours_rss_mb": statistics.median(r for _, r in ours),
                "ours_merge_s": statistics.median(merge_times),
                "floor_s": floor,
            }
            if theirs:
                row["mergekit_s"] = statistics.median(w for w, _ in theirs)
                row["mergekit_rss_mb"] = statistics.median(r for _, r in theirs)
            if againsts:
                row["against_s"] = statistics.median(w for w, _ in againsts)
                row["against_rss_mb"] = statistics.median(r for _, r in againsts)
            rows.append(row)
            print(json.dumps(row))
            shutil.rmtree(out, ignore_errors=True)

    print()
    print(
        f"{'family':<8}{'method':<16}{'ours s':>9}{'mergekit s':>12}{'ratio':>8}{'ours MB':>10}{'mergekit MB':>13}"
        f"{'ratio':>8}{'merge s':>9}{'floor s':>9}{'×floor':>8}"
    )
    for r in rows:
        mk_s, mk_mb = r.get("mergekit_s"), r.get("mergekit_rss_mb")
        ratio_s = f"{r['ours_s'] / mk_s:.2f}" if mk_s else "-"
        ratio_mb = f"{r['ours_rss_mb'] / mk_mb:.2f}" if mk_mb else "-"
        print(
            f"{r['family']:<8}{r['method']:<16}{r['ours_s']:>9.1f}{(mk_s or 0):>12.1f}{ratio_s:>8}"
            f"{r['ours_rss_mb']:>10.0f}{(mk_mb or 0):>13.0f}{ratio_mb:>8}{r['ours_merge_s']:>9.1f}"
            f"{r['floor_s']:>9.1f}{r['ours_merge_s'] / r['floor_s']:>8.2f}"
        )
    if args.against:
        print(f"\nside by side with {args.against} (interleaved runs, medians):")
        print(f"{'family':<8}{'method':<16}{'this s':>9}{'against s':>11}{'ratio':>8}{'this MB':>10}"
              f"{'against MB':>12}{'ratio':>8}")
        for r in rows:
            print(f"{r['family']:<8}{r['method']:<16}{r['ours_s']:>9.1f}{r['against_s']:>11.1f}"
                  f"{r['ours_s'] / r['against_s']:>8.2f}{r['ours_rss_mb']:>10.0f}{r['against_rss_mb']:>12.0f}"
                  f"{r['ours_rss_mb'] / r['against_rss_mb']:>8.2f}")
    print(f"(whole-process times include start-up: import torch {torch_startup:.2f}s, "
          f"import lightning_merge.cli.commands {startup:.2f}s)")


if __name__ == "__main__":
    main()
