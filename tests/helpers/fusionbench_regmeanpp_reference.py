"""Run FusionBench's RegMean++ on models saved by the parity test; executed by the fusion-bench environment's Python.

    python fusionbench_regmeanpp_reference.py FOLDER N ALPHA EXAMPLES BATCH

Reads FOLDER/base.pt, FOLDER/expert{i}.pt (state dicts of :class:`TinyEncoder`) and FOLDER/tokens{i}.pt (task i's
token ids), runs ``RegMeanAlgorithmPlusPlus.run`` (FusionBench 0.2.33) with the CLIP subclass's own Gram hooks
(``RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights``) and this model's versions of the CLIP-specific methods
(embedding merge, first-layer input, layer forward), and saves FOLDER/fusionbench.pt.
"""

import sys
import types

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm residual MLP block: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class TinyEncoder(nn.Module):
    """Token embeddings, a norm, then ``layers``: CLIP's vision tower in miniature (embeddings, pre_layrnorm,
    encoder.layers), without anything after the last layer."""

    def __init__(self, vocab: int = 13, d: int = 6, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pre_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.pre_norm(self.embed(ids))
        for layer in self.layers:
            h = layer(h)
        return h


def main(folder: str, n: int, alpha: float, examples: int, batch: int) -> None:
    from fusion_bench.method.regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus, RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool

    def load(name: str) -> nn.Module:
        model = TinyEncoder()
        model.load_state_dict(torch.load(f"{folder}/{name}.pt", weights_only=True))
        return model

    tokens = {f"task{i}": torch.load(f"{folder}/tokens{i}.pt", weights_only=True) for i in range(n)}

    class Pool(BaseModelPool):
        def load_train_dataset(self, dataset_name, *args, **kwargs):
            return tokens[dataset_name]

    class TinyRegMeanPlusPlus(RegMeanAlgorithmPlusPlus):
        # the reference's own hooks (the CLIP subclass's), with an identity Fabric
        get_regmean_weights = RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights
        fabric = types.SimpleNamespace(setup=lambda module: module)

        def merge_embedding_layer(self, models_to_merge_dict):  # as the CLIP subclass: the mean of the experts'
            states = [m.state_dict() for m in models_to_merge_dict.values()]
            return {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]
                    if k.startswith(("embed.", "pre_norm."))}

        def get_input_for_first_layer(self, model, train_dataset):  # batches until num_regmean_examples, unshuffled
            out, count = [], 0
            for start in range(0, len(train_dataset), batch):
                if count >= self.num_regmean_examples:
                    break
                ids = train_dataset[start:start + batch]
                out.append(model.pre_norm(model.embed(ids)).detach())
                count += ids.shape[0]
            return out

        def get_layers(self, model):
            return model.layers

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            for key, value in new_merged_params.items():
                merged_params_dict[f"layers.{layer_idx}.{key}"] = value
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            return [layer(b).detach() for b in batches_input]

    pool = Pool({"_pretrained_": load("base"), **{f"task{i}": load(f"expert{i}") for i in range(n)}})
    method = TinyRegMeanPlusPlus(num_regmean_examples=examples, exclude_param_names_regex=[],
                                 reduce_non_diagonal_ratio=alpha, weight_transpose=True)
    merged = method.run(pool)
    torch.save({k: v.detach().cpu() for k, v in merged.state_dict().items()}, f"{folder}/fusionbench.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
