"""Run FusionBench's DOP on models saved by the parity test; executed by the fusion-bench environment's Python.

    python fusionbench_dop_reference.py FOLDER N OPTIONS_JSON

Reads FOLDER/base.pt and FOLDER/expert{i}.pt (state dicts of `fusionbench_opcm_reference.build()`), applies
FusionBench's own `ContinualDOPForCLIP._layer_wise_optimize` (its `_optimize_weight`, `cal_loss_i`, `MinNormSolver`,
`simple_average`) in the loop of `ContinualDOPForCLIP.run` without shuffling, on the CPU, and saves
FOLDER/fusionbench.pt. OPTIONS_JSON holds the method's arguments (lr, num_steps, mgda, ema, ema_beta, alpha,
svd_epsilon, svd_proj_space).
"""

import json
import sys
import types
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_opcm_reference import build  # noqa: E402


def main(folder: str, n: int, options: str) -> None:
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP

    class Algorithm:  # the method's own functions, without its Lightning Fabric or model pool
        _layer_wise_optimize = ContinualDOPForCLIP._layer_wise_optimize
        _optimize_weight = ContinualDOPForCLIP._optimize_weight
        cal_loss_i = ContinualDOPForCLIP.cal_loss_i

    algorithm = Algorithm()
    algorithm.__dict__.update(json.loads(options))
    algorithm.fabric = types.SimpleNamespace(world_size=1, to_device=lambda x: x)

    def load(path: str):
        model = build()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model

    pretrained = load(f"{folder}/base.pt")
    merged = load(f"{folder}/expert0.pt")
    for i in range(1, n):  # the loop body of ContinualDOPForCLIP.run
        merged = algorithm._layer_wise_optimize(
            model_names=["merged", f"expert{i}"],
            pretrained_model=deepcopy(pretrained),
            finetuned_models={"merged": merged, f"expert{i}": load(f"{folder}/expert{i}.pt")},
            model_idx=i,
        )
    torch.save(merged.state_dict(), f"{folder}/fusionbench.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
