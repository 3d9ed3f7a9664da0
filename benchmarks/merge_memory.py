"""Peak memory of a merge and of a continual add, above the process's start-up, against the largest tensor and the
model: this code side by side with another checkout (``--against``) and with mergekit on the same model.

Two shapes (issue 32):

- ``dominant``: a Llama from a config whose embedding (65536 × 1024 float32, 256 MiB) dwarfs its other tensors (one
  layer, hidden 1024): ``merge`` of three experts and the base with task arithmetic, TIES (0.3), Fisher, OTA, linear and
  DARE-TIES (mergekit's ``dare_ties``: drop 0.7, L1 rescale),
  and ``continual add`` (linear, the third add).
- ``many``: 16 tensors of 2048 × 2048 float32 (256 MiB in all): the same merges and continual adds (linear and OPCM).

Each case runs in a fresh process: it imports the library, opens nothing, records its resident set (start-up), runs
the merge or the adds, and reports its peak resident set (``VmHWM``; not ``ru_maxrss``, which Linux carries over
from the parent across ``exec``) minus the start-up. mergekit's peak is its whole high-water mark, sampled from
``/proc`` while it runs. Outputs are compared
bit for bit with ``--against``'s.

    python benchmarks/merge_memory.py                                  # this checkout
    python benchmarks/merge_memory.py --against /path/to/old/checkout  # side by side (same machine, same run)
    python benchmarks/merge_memory.py --mergekit .venv-mergekit/bin/mergekit-yaml
    python benchmarks/merge_memory.py --shapes many --only "continual opcm"   # one case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20

DRIVER = r'''
import json, os, resource, sys, time
import torch
import lightning_merge
from lightning_merge import merge, ContinualState
import lightning_merge.strategies as S

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def rss():
    return status("VmRSS")

spec = json.loads(sys.argv[1])
torch.set_num_threads(2)
if spec.get("limit_heap"):  # glibc's mmap threshold fixed (lightning_merge.engine.schedule.limit_heap_growth)
    from lightning_merge.engine.schedule import limit_heap_growth
    limit_heap_growth()
start = rss()
t0 = time.perf_counter()
extra = {"memory_budget": spec["budget"]} if spec.get("budget") else {}
if spec["kind"] == "merge":
    strategy = S.Strategy.from_dict(spec["strategy"])
    merge(spec["experts"], spec["base"], strategy, spec["out"], **extra)
else:
    state = ContinualState.create(spec["out"], base=spec["base"], strategy=S.Strategy.from_dict(spec["strategy"]))
    for e in spec["experts"]:
        state.add(e, **extra)
seconds = time.perf_counter() - t0
peak = status("VmHWM")  # this process's own high-water mark (ru_maxrss keeps the parent's across exec)
print(json.dumps({"start": start, "peak": peak, "seconds": seconds}))
'''


def write_models(root: Path, shape: str) -> tuple[Path, list[Path], int, int]:
    """The base and three experts (safetensors folders) of ``shape``; returns (base, experts, largest, model bytes)."""
    import torch
    from safetensors.torch import save_file

    from lightning_merge.formats.sidecar import write_statistics

    g = torch.Generator().manual_seed(0)
    if shape == "dominant":
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=65536, hidden_size=1024, intermediate_size=512, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                             torch_dtype="float32", architectures=["LlamaForCausalLM"])
        names = {"model.embed_tokens.weight": (65536, 1024), "model.norm.weight": (1024,),
                 "model.layers.0.input_layernorm.weight": (1024,),
                 "model.layers.0.post_attention_layernorm.weight": (1024,)}
        for p in ("q", "k", "v", "o"):
            names[f"model.layers.0.self_attn.{p}_proj.weight"] = (1024, 1024)
        names.update({"model.layers.0.mlp.gate_proj.weight": (512, 1024), "model.layers.0.mlp.up_proj.weight":
                      (512, 1024), "model.layers.0.mlp.down_proj.weight": (1024, 512)})
    else:
        config = None
        names = {f"layers.{i}.weight": (2048, 2048) for i in range(16)}
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in names.items()}
    paths = []
    for i, tensors in enumerate([base] + [None] * 3):
        folder = root / ("base" if i == 0 else f"e{i}")
        folder.mkdir(parents=True, exist_ok=True)
        if tensors is None:
            tensors = {n: v + 0.001 * torch.randn(v.shape, generator=g) for n, v in base.items()}
            write_statistics(folder / "statistics.safetensors",
                             {"fisher.example": {n: torch.rand(v.shape, generator=g) + 0.1 for n, v in base.items()},
                              "exp_avg_sq": {n: torch.rand(v.shape, generator=g) + 0.1 for n, v in base.items()}},
                             {"fisher.example": {"count": 8}, "exp_avg_sq": {"beta2": 0.999, "step": 10}})
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            config.save_pretrained(folder)
        paths.append(folder)
        del tensors
    largest = max(v.numel() * 4 for v in base.values())
    model = sum(v.numel() * 4 for v in base.values())
    return paths[0], paths[1:], largest, model


def run_case(code: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=str(code))
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_output(a: Path, b: Path) -> bool | None:
    import torch
    from safetensors.torch import load_file

    fa, fb = sorted(a.rglob("model*.safetensors")), sorted(b.rglob("model*.safetensors"))
    if not fa or len(fa) != len(fb):
        return None
    for x, y in zip(fa, fb):
        ta, tb = load_file(str(x)), load_file(str(y))
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def mergekit_peak(mergekit: str, base: Path, experts: list[Path], out: Path, method: str) -> dict:
    params = {"task_arithmetic": "weight: 1.0", "ties": "weight: 1.0\n      density: 0.3", "linear": "weight: 1.0"}
    models = "\n".join(f"  - model: {e}\n    parameters:\n      {params[method]}" for e in experts)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n{models}\n")
    t0 = time.perf_counter()
    child = subprocess.Popen([mergekit, str(recipe), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    err = child.stderr.read() if child.stderr else ""
    if child.returncode != 0:
        return {"error": err.strip().splitlines()[-1][:160] if err.strip() else f"exit {child.returncode}"}
    return {"peak": peak, "seconds": seconds}


CASES = {
    "dominant": [("merge", {"name": "task_arithmetic"}), ("merge", {"name": "ties", "density": 0.3}),
                 ("merge", {"name": "fisher"}), ("merge", {"name": "ota"}), ("merge", {"name": "linear"}),
                 ("merge", {"name": "dare", "drop_rate": 0.7, "combine": "ties", "rescale": "l1"}),
                 ("continual", {"name": "linear"})],
    "many": [("merge", {"name": "task_arithmetic"}), ("merge", {"name": "ties", "density": 0.3}),
             ("merge", {"name": "fisher"}), ("continual", {"name": "linear"}), ("continual", {"name": "opcm"})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=None, help="another checkout to run side by side")
    parser.add_argument("--mergekit", default=None, help="mergekit-yaml to measure on the dominant shape")
    parser.add_argument("--shapes", nargs="+", default=["dominant", "many"], choices=list(CASES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--budget", default=None, help="memory_budget for this checkout (e.g. 1GB; default: its own)")
    parser.add_argument("--limit-heap", action="store_true", help="this checkout's cases call limit_heap_growth()")
    parser.add_argument("--only", nargs="+", default=None, metavar="CASE",
                        help="run only these cases, by their label (e.g. 'continual opcm', 'merge ties 0.3')")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    codes = [("this", here)] + ([("against", args.against.resolve())] if args.against else [])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-memory-"))
    print(f"# merge_memory: {os.cpu_count()} cores; peak RSS above start-up, in MiB and as multiples; {work}")
    rows = []
    for shape in args.shapes:
        base, experts, largest, model = write_models(work / shape, shape)
        print(f"\n## {shape}: largest tensor {largest / MiB:.0f} MiB, model {model / MiB:.0f} MiB")
        print("| case | code | above start-up MiB | ÷ largest | ÷ model | seconds | same output |")
        print("|---|---|---|---|---|---|---|")
        for kind, strategy in CASES[shape]:
            label = f"{kind} {strategy['name']}" + (f" {strategy['density']}" if "density" in strategy else "")
            if args.only is not None and label not in args.only:
                continue
            outs = {}
            for tag, code in codes:
                out = work / shape / f"out-{tag}-{kind}-{strategy['name']}"
                spec = {"kind": kind, "strategy": strategy, "base": str(base), "out": str(out),
                        "experts": [str(e) for e in experts], "budget": args.budget if tag == "this" else None,
                        "limit_heap": args.limit_heap and tag == "this"}
                got = run_case(code, spec)
                outs[tag] = out
                if "error" in got:
                    print(f"| {label} | {tag} | error: {got['error']} | | | | |")
                    continue
                above = got["peak"] - got["start"]
                same = "" if tag == "this" else same_output(outs["this"], out)
                print(f"| {label} | {tag} | {above / MiB:.0f} | {above / largest:.2f} | {above / model:.2f} | "
                      f"{got['seconds']:.1f} | {same} |", flush=True)
                rows.append({"shape": shape, "case": label, "code": tag, "above": above, "largest": largest,
                             "model": model, "seconds": got["seconds"]})
        if args.mergekit and shape == "dominant":
            for method in ("task_arithmetic", "ties"):
                got = mergekit_peak(args.mergekit, base, experts, work / shape / f"mergekit-{method}", method)
                if "error" in got or got["peak"] is None:
                    print(f"| merge {method} | mergekit | {got.get('error', 'n/a')} | | | | |")
                    continue
                print(f"| merge {method} | mergekit (whole peak, start-up included) | {got['peak'] / MiB:.0f} | "
                      f"{got['peak'] / largest:.2f} | {got['peak'] / model:.2f} | {got['seconds']:.1f} | |", flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
