"""Merging 4 rank-16 LoRA adapters into one adapter: lightning-merge against PEFT's ``add_weighted_adapter``
(combination_type="svd") on the same adapters, on MiniLM-L6 and on a ~400M-parameter Llama-architecture model.

Each method runs in its own process (peak RSS is its own). The merge is the weighted sum Σ wᵢ sᵢ BᵢAᵢ of every
adapted module, factored at rank 16 by a truncated SVD (PEFT's svd combination; lightning-merge's TaskArithmetic
with output="peft", rank=16); lightning-merge's exact mode (concatenated factors, rank 64, no SVD) is shown too.
A TIES merge (not linear in the adapters: each module's ΔW is merged, then factored as soon as it is merged) is
compared with PEFT's ``ties_svd`` too (the two TIES variants differ in detail: PEFT weights after the election).
Prints time, peak memory, and the relative difference of the two linear adapters' ΔW.

    python benchmarks/lora_merge.py [--models minilm llama400m]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _child import run_measured  # noqa: E402

WEIGHTS = [0.4, 0.3, 0.2, 0.1]
TARGETS = {"minilm": ["query", "value"], "llama400m": ["q_proj", "k_proj", "v_proj", "o_proj"]}

PEFT_RUN = r"""
import torch, transformers, peft
root, kind, combination = sys.argv[1], sys.argv[2], sys.argv[3]
base = transformers.AutoModel.from_pretrained(root + "/base") if kind == "minilm" else \
    transformers.AutoModelForCausalLM.from_pretrained(root + "/base")
model = peft.PeftModel.from_pretrained(base, root + "/ad0", adapter_name="ad0")
for i in (1, 2, 3):
    model.load_adapter(root + f"/ad{i}", adapter_name=f"ad{i}")
extra = {"density": 0.5} if combination == "ties_svd" else {}
model.add_weighted_adapter(["ad0", "ad1", "ad2", "ad3"], WEIGHTS, "merged", combination_type=combination, svd_rank=16,
                           **extra)
model.save_pretrained(root + "/peft_" + combination, selected_adapters=["merged"])
""".replace("WEIGHTS", repr(WEIGHTS))

OURS_RUN = r"""
from lightning_merge import TaskArithmetic, Ties, merge
root, rank, kind = sys.argv[1], sys.argv[2], sys.argv[3]
experts = [root + f"/ad{i}" for i in range(4)]
strategy = Ties(density=0.5, weights=WEIGHTS) if kind == "ties" else TaskArithmetic(weights=WEIGHTS)
merge(experts, base=root + "/base", strategy=strategy, out=root + f"/ours_{kind}_{rank}",
      output="peft", rank=None if rank == "exact" else int(rank), overwrite=True)
""".replace("WEIGHTS", repr(WEIGHTS))


def prepare(kind: str, root: Path) -> int:
    import peft
    import torch
    import transformers

    if kind == "minilm":
        from _minilm import minilm_path

        def make():
            return transformers.AutoModel.from_pretrained(minilm_path())
    else:
        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
        )

        def make():
            torch.manual_seed(0)
            return transformers.LlamaForCausalLM(config)

    base = make()
    base.save_pretrained(root / "base")
    params = sum(p.numel() for p in base.parameters())
    for i in range(4):
        torch.manual_seed(i + 1)
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS[kind], init_lora_weights=False)
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / f"ad{i}")
        base = model.unload()
    return params


def deltas(folder: Path) -> dict:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        stem = key.split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = stem.split("base_model.model.")[-1]
        r = a.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if module.endswith(pattern.replace("\\", "")):
                alpha = value
        out[module] = (b.float() @ a.float()) * (alpha / r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "llama400m"])
    args = parser.parse_args()
    for kind in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            params = prepare(kind, root)
            peft_fig = run_measured(PEFT_RUN, str(root), kind, "svd")
            ours = run_measured(OURS_RUN, str(root), "16", "linear")
            exact = run_measured(OURS_RUN, str(root), "exact", "linear")
            peft_ties = run_measured(PEFT_RUN, str(root), kind, "ties_svd")
            ours_ties = run_measured(OURS_RUN, str(root), "16", "ties")
            a, b = deltas(root / "peft_svd" / "merged"), deltas(root / "ours_linear_16")
            diff = max(float((a[m] - b[m]).norm() / b[m].norm()) for m in b)
            exact_delta = deltas(root / "ours_linear_exact")
            svd_err = max(float((exact_delta[m] - b[m]).norm() / exact_delta[m].norm()) for m in b)
            print(f"\n{kind}: {params / 1e6:.0f}M parameters, 4 adapters r=16 on {', '.join(TARGETS[kind])}")
            print(f"  {'method':50s}{'seconds':>9s}{'peak MB':>9s}")
            rows = [
                ("PEFT add_weighted_adapter (svd, rank 16)", peft_fig),
                ("lightning-merge, TaskArithmetic, rank 16 (SVD)", ours),
                ("lightning-merge, exact (concatenated, r 64)", exact),
                ("PEFT add_weighted_adapter (ties_svd 0.5, rank 16)", peft_ties),
                ("lightning-merge, Ties(density=0.5), rank 16", ours_ties),
            ]
            for label, fig in rows:
                print(f"  {label:50s}{fig['seconds']:9.1f}{fig['peak_mb']:9.0f}")
            print(
                f"  linear: time ratio {ours['seconds'] / peft_fig['seconds']:.2f}, memory ratio "
                f"{ours['peak_mb'] / peft_fig['peak_mb']:.2f} (ours / PEFT)"
            )
            print(
                f"  TIES:   time ratio {ours_ties['seconds'] / peft_ties['seconds']:.2f}, memory ratio "
                f"{ours_ties['peak_mb'] / peft_ties['peak_mb']:.2f} (ours / PEFT; the two TIES differ in detail)"
            )
            print(f"  largest relative ΔW difference, ours vs PEFT (linear, rank 16): {diff:.2e}")
            print(f"  largest relative error of rank 16 against the exact merge: {svd_err:.3f}")


if __name__ == "__main__":
    main()
