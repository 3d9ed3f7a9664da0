"""Run FusionBench's OPCM on models saved by the parity test; executed by the fusion-bench environment's Python.

    python fusionbench_opcm_reference.py FOLDER ALPHA N [KIND]

Reads FOLDER/base.pt and FOLDER/expert{i}.pt (state dicts of the module built by `build(KIND)`), applies FusionBench's
own per-layer functions (`OPCMForCLIP.merge_linear_weights` / `merge_other_parameters`, `get_task_vector_norm`) in
the loop of `OPCMForCLIP.run` with `shuffle_order=False`, and saves FOLDER/fusionbench.pt.
"""

import sys
import types

import numpy as np
import torch
from torch import nn


class TinyLM(nn.Module):
    """A causal LM's parameter names: an embedding, a linear layer, a norm and an untied ``lm_head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.layer = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)


def build(kind: str = "sequential") -> nn.Module:
    if kind == "lm":
        return TinyLM()
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 6))


def main(folder: str, alpha: float, n: int, kind: str = "sequential") -> None:
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.method.opcm.utils import get_task_vector_norm, is_leaf_module

    pretrained = build(kind)
    pretrained.load_state_dict(torch.load(f"{folder}/base.pt", weights_only=True))
    models = []
    for i in range(n):
        m = build(kind)
        m.load_state_dict(torch.load(f"{folder}/expert{i}.pt", weights_only=True))
        models.append(m)
    algo = types.SimpleNamespace(previous_lambda_t=1, lambda_t=None)
    merge_linear = OPCMForCLIP.merge_linear_weights.__get__(algo)
    merge_other = OPCMForCLIP.merge_other_parameters.__get__(algo)
    with torch.no_grad():
        merged = models[0]
        norms = [get_task_vector_norm(merged, pretrained)]
        for task_model in models[1:]:  # the loop body of OPCMForCLIP.run
            norms.append(get_task_vector_norm(task_model, pretrained))
            avg = np.mean(norms)
            algo.lambda_t = 1
            for module_name, module in list(merged.named_modules()):
                if not is_leaf_module(module):
                    continue
                if isinstance(module, nn.Linear):
                    module.weight.data = merge_linear(
                        module.weight,
                        pretrained.get_submodule(module_name).weight,
                        task_model.get_submodule(module_name).weight,
                        param_name=module_name + ".weight",
                        alpha=alpha,
                    )
                    if module.bias is not None:
                        module.bias.data = merge_other(
                            module.bias,
                            pretrained.get_submodule(module_name).bias,
                            task_model.get_submodule(module_name).bias,
                            param_name=module_name + ".bias",
                        )
                else:
                    for param_name, param in module.named_parameters():
                        param.data = merge_other(
                            param,
                            pretrained.get_submodule(module_name).get_parameter(param_name),
                            task_model.get_submodule(module_name).get_parameter(param_name),
                            param_name=f"{module_name}.{param_name}",
                        )
            tv_norm = get_task_vector_norm(merged, pretrained)
            algo.lambda_t *= tv_norm / avg
            for param_name, param in merged.named_parameters():
                base = pretrained.get_parameter(param_name)
                param.data = base + (param - base) * (avg / tv_norm)
            algo.previous_lambda_t = algo.lambda_t
            algo.lambda_t = None
    torch.save(merged.state_dict(), f"{folder}/fusionbench.pt")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
