"""Merging adapters inside a live PeftModel into a new named adapter, with every strategy: the new adapter's
weights equal the merge of the same adapters saved as folders (exact for linear strategies, SVD at full rank for the
others)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from capture_helpers import tiny_llama_config  # noqa: E402

from lightning_merge import (  # noqa: E402
    OPCM,
    OTA,
    Breadcrumbs,
    Cabs,
    Consensus,
    Dare,
    Fisher,
    Generalized,
    Linear,
    LiNeS,
    TaskArithmetic,
    Ties,
    WeightedMedian,
    merge,
)
from lightning_merge.formats.sidecar import write_statistics  # noqa: E402
from lightning_merge.tools.peft_models import add_merged_adapter  # noqa: E402

STRATEGIES = [
    Linear(), TaskArithmetic(weights=[0.7, 0.5]), Ties(density=0.5), Dare(drop_rate=0.3, combine="ties"),
    Breadcrumbs(density=0.8), Cabs(n=2, m=8), Generalized(sparsification="random", density=0.5), Consensus(),
    Fisher(), OTA(density=0.5), WeightedMedian(), OPCM(), LiNeS(TaskArithmetic(), alpha=0.5),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj", "down_proj"])):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                    peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets,
                                                    init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        state = peft.get_peft_model_state_dict(model)
        write_statistics(root / f"a{i}" / "statistics.safetensors",
                         {"fisher.example": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in state.items()},
                          "exp_avg_sq": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in state.items()}},
                         {"fisher.example": {"count": 4}, "exp_avg_sq": {"beta2": 0.99, "step": 10}})
        paths.append(root / f"a{i}")
    return root, paths


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.name for s in STRATEGIES])
def test_every_strategy_adds_the_adapter_the_folders_merge_to(folders, strategy):
    root, paths = folders
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"), paths[0],
                                           adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    rank = None if strategy.linear else 64
    stats = {"a": paths[0] / "statistics.safetensors", "b": paths[1] / "statistics.safetensors"}
    add_merged_adapter(model, ["a", "b"], "merged", strategy, rank=rank, statistics=stats)
    expected = merge(paths, root / "base", strategy)
    model.set_adapter("merged")
    merged = model.merge_and_unload(adapter_names=["merged"]).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].float(), value.float(), rtol=1e-4, atol=1e-5)


def test_names_are_checked(folders):
    root, paths = folders
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"), paths[0],
                                           adapter_name="a")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        add_merged_adapter(model, ["a", "nope"], "m", Linear())
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        add_merged_adapter(model, ["a"], "a", Linear())


@pytest.mark.parametrize("strategy", [Fisher(), OTA(density=0.5)], ids=["fisher", "ota"])
def test_adapter_folders_bring_their_statistics(folders, strategy):
    """Issue 30 #5: a curvature merge of adapters given as folders reads each folder's statistics.safetensors (it
    demanded statistics={...}); an adapter given by name with none is refused, naming both remedies."""
    root, paths = folders
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"), paths[0],
                                           adapter_name="a")
    with pytest.raises(ValueError, match=r"adapter 'a' carries none: give its folder"):
        add_merged_adapter(model, ["a", paths[1]], "merged", strategy, rank=64)
    add_merged_adapter(model, [str(paths[0]), paths[1]], "merged", strategy, rank=64)
    assert sorted(model.peft_config) == ["a", "merged"]  # the folders were read, not loaded into the model
    expected = merge(paths, root / "base", strategy)
    model.set_adapter("merged")
    merged = model.merge_and_unload(adapter_names=["merged"]).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].float(), value.float(), rtol=1e-4, atol=1e-5)
