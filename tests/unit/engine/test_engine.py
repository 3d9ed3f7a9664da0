"""The streaming engine and experts: file formats, names, dtypes, policies, outputs, atomicity."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_models
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge import Expert, Linear, Strategy, TaskArithmetic, Ties, merge
from lightning_merge.strategies.task_vectors import TaskVectorMerge


def save_folder(state, folder: Path, shards: int = 1):
    folder.mkdir(parents=True)
    names = list(state)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    else:
        weight_map = {}
        for s in range(shards):
            part = {n: state[n].contiguous() for n in names[s::shards]}
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, folder / file)
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return folder


def test_expert_sources_agree(tmp_path):
    base, _ = make_models(1)
    save_file(base, tmp_path / "m.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.items()}, "epoch": 1}, tmp_path / "m.ckpt")
    folder = save_folder(base, tmp_path / "hf", shards=2)
    module = nn.Linear(3, 2)
    sources = [
        Expert(base),
        Expert(tmp_path / "m.safetensors"),
        Expert(tmp_path / "m.ckpt", prefix="model."),
        Expert(folder),
    ]
    for expert in sources:
        assert sorted(expert.names()) == sorted(base)
        for name, value in base.items():
            assert expert.spec(name).shape == tuple(value.shape)
            assert expert.spec(name).dtype == value.dtype
            assert torch.equal(expert.tensor(name), value)
    assert sorted(Expert(module).names()) == ["bias", "weight"]


def test_expert_errors_are_clear(tmp_path):
    base, _ = make_models(1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Expert(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="no tensor under prefix 'model.'"):
        Expert(base, prefix="model.")
    with pytest.raises(KeyError, match="has no tensor 'nope'"):
        Expert(base).tensor("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model weights"):
        Expert(tmp_path / "empty")


def test_checkpoint_with_custom_objects_needs_explicit_trust(tmp_path):
    path = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"args": argparse.Namespace(lr=1)}}, path)
    with pytest.raises(ValueError, match=r"argparse.Namespace.*trust_checkpoint=True"):
        Expert(path)
    assert torch.equal(Expert(path, trust_checkpoint=True).tensor("w"), torch.ones(2))


def test_safetensors_spec_reads_no_data(tmp_path, monkeypatch):
    base, _ = make_models(1)
    save_file(base, tmp_path / "m.safetensors")
    expert = Expert(tmp_path / "m.safetensors")
    calls = []
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a))
    assert expert.spec("layers.0.weight").numel == 128
    assert calls == []


def test_truncated_safetensors_is_reported(tmp_path):
    base, _ = make_models(1)
    path = tmp_path / "m.safetensors"
    save_file(base, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"m.safetensors' is truncated or corrupted: tensor"):
        Expert(path)
    path.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="truncated"):
        Expert(path)


def test_folder_output_is_sharded_and_round_trips(tmp_path):
    base, experts = make_models(3)
    folder = save_folder(base, tmp_path / "base")
    expected = merge(experts, base, Ties(density=0.5))
    out = merge(experts, folder, Ties(density=0.5), out=tmp_path / "merged", shard_size=600)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "lightning_merge.json" in files
    assert sum(f.startswith("model-") for f in files) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    reread = Expert(out)
    for name, value in expected.items():
        assert torch.equal(reread.tensor(name), value)
    provenance = json.loads((out / "lightning_merge.json").read_text())
    assert provenance["strategy"] == Ties(density=0.5).to_dict()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_single_safetensors_file_output(tmp_path):
    base, experts = make_models(2)
    out = merge(experts, base, TaskArithmetic(scale=0.5), out=tmp_path / "m.safetensors")
    got = load_file(out)
    expected = merge(experts, base, TaskArithmetic(scale=0.5))
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k])


def test_bf16_storage_computed_in_float32(tmp_path):
    base, experts = make_models(3, dtype=torch.bfloat16)
    got = merge(experts, base, TaskArithmetic(scale=0.3))
    name = "layers.0.weight"
    exact = base[name].float() + 0.3 * sum(e[name].float() - base[name].float() for e in experts)
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], exact.to(torch.bfloat16))
    assert merge(experts, base, TaskArithmetic(), dtype="float32")[name].dtype == torch.float32


def test_missing_tensor_policies():
    base, experts = make_models(2)
    extra = dict(experts[1])
    del extra["layers.1.weight"]
    extra["head.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"tensor 'layers.1.weight' is in .* but not in .*on_missing='base'"):
        merge([experts[0], extra], base, TaskArithmetic())
    got = merge([experts[0], extra], base, TaskArithmetic(), on_missing="base")
    assert set(got) == set(base)
    # the expert lacking it counts as the base there: τ = 0
    torch.testing.assert_close(got["layers.1.weight"], experts[0]["layers.1.weight"])
    got = merge([experts[0], extra], base, TaskArithmetic(), on_missing="intersection")
    assert set(got) == set(base) - {"layers.1.weight"}
    got = merge([experts[0], extra], base, TaskArithmetic(), on_missing="union")
    assert set(got) == set(base) | {"head.weight"}
    assert torch.equal(got["head.weight"], torch.ones(2))


def test_shape_and_dtype_mismatch_errors():
    base, experts = make_models(2)
    bad = dict(experts[1], **{"layers.0.bias": torch.zeros(17)})
    with pytest.raises(ValueError, match=r"'layers.0.bias' has shape \[16\] in .* but \[17\]"):
        merge([experts[0], bad], base, TaskArithmetic())
    half = dict(experts[1], **{"layers.0.bias": experts[1]["layers.0.bias"].half()})
    with pytest.raises(ValueError, match=r"different dtypes.*pass dtype="):
        merge([experts[0], half], base, TaskArithmetic())
    assert merge([experts[0], half], base, TaskArithmetic(), dtype="float32")["layers.0.bias"].dtype == torch.float32


def test_non_floating_tensors_copied_checked_and_counters_maxed():
    base, experts = make_models(2)
    base["bn.num_batches_tracked"] = torch.tensor(5)
    experts[0]["bn.num_batches_tracked"] = torch.tensor(9)
    experts[1]["bn.num_batches_tracked"] = torch.tensor(7)
    got = merge(experts, base, Linear())
    assert torch.equal(got["position_ids"], base["position_ids"])
    assert int(got["bn.num_batches_tracked"]) == 9
    experts[1]["position_ids"] = torch.arange(5) + 1
    with pytest.raises(ValueError, match="non-floating tensor 'position_ids' differs"):
        merge(experts, base, Linear())


def test_include_exclude_copy_from_base():
    base, experts = make_models(2)
    got = merge(experts, base, TaskArithmetic(), exclude=["layers.1.*"])
    assert torch.equal(got["layers.1.weight"], base["layers.1.weight"])
    assert not torch.equal(got["layers.0.weight"], base["layers.0.weight"])
    got = merge(experts, base, TaskArithmetic(), include="layers.0.weight")
    assert torch.equal(got["layers.0.bias"], base["layers.0.bias"])
    assert not torch.equal(got["layers.0.weight"], base["layers.0.weight"])


def test_unmerged_tensors_come_from_the_first_expert_on_request(tmp_path):
    base, experts = make_models(2)
    got = merge(experts, base, TaskArithmetic(), exclude=["layers.1.*"], unmerged_from="first")
    assert torch.equal(got["layers.1.weight"], experts[0]["layers.1.weight"])
    assert not torch.equal(experts[0]["layers.1.weight"], base["layers.1.weight"])
    torch.testing.assert_close(got["layers.0.weight"], merge(experts, base, TaskArithmetic())["layers.0.weight"])
    streamed = merge(experts, base, TaskArithmetic(), exclude=["layers.1.*"], unmerged_from="first",
                     out=tmp_path / "m.safetensors")
    from lightning_merge import Expert

    assert torch.equal(Expert(streamed).tensor("layers.1.weight"), experts[0]["layers.1.weight"])
    with pytest.raises(ValueError, match="unmerged_from must be 'base' or 'first'"):
        merge(experts, base, TaskArithmetic(), unmerged_from="last")


def test_merge_into_module_in_place():
    modules = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(3)]
    target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    weight_param = target[0].weight
    result = merge(modules, strategy=Linear(), out=target)
    assert result is target and target[0].weight is weight_param
    torch.testing.assert_close(target[0].weight, sum(m[0].weight for m in modules) / 3)
    with pytest.raises(ValueError, match="module has tensors the merge does not produce"):
        merge([m[0] for m in modules], strategy=Linear(), out=target)


def test_checkpoint_output_keeps_template_and_prefix(tmp_path):
    base, experts = make_models(2)
    paths = []
    for i, state in enumerate([base] + experts):
        ckpt = {
            "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "head.weight": torch.full((2,), i)},
            "epoch": 3,
            "global_step": 30,
            "optimizer_states": [{}],
            "hyper_parameters": {"lr": 0.1},
            "pytorch-lightning_version": "2.6.0",
        }
        torch.save(ckpt, tmp_path / f"{i}.ckpt")
        paths.append(Expert(tmp_path / f"{i}.ckpt", prefix="model."))
    out = merge(paths[1:], paths[0], TaskArithmetic(scale=0.5), out=tmp_path / "merged.ckpt")
    ckpt = torch.load(out, weights_only=True)
    expected = merge(experts, base, TaskArithmetic(scale=0.5))
    for k, v in expected.items():
        assert torch.equal(ckpt["state_dict"][f"model.{k}"], v)
    assert torch.equal(ckpt["state_dict"]["head.weight"], torch.zeros(2))  # outside the prefix: from the template
    assert ckpt["hyper_parameters"] == {"lr": 0.1} and ckpt["global_step"] == 30
    assert "optimizer_states" not in ckpt
    assert ckpt["lightning_merge"]["strategy"]["name"] == "task_arithmetic"


class Exploding(TaskVectorMerge):
    name = "exploding_test_strategy"

    def merge_tensor(self, name, base, tensors, stats):
        if name == "layers.1.weight":
            raise RuntimeError("boom")
        return base


def test_failed_merge_leaves_no_output_and_keeps_previous(tmp_path):
    base, experts = make_models(2)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"):
        merge(experts, base, Exploding(), out=out)
    assert list(tmp_path.iterdir()) == []
    merge(experts, base, TaskArithmetic(), out=out)
    before = load_file(out / "model.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge(experts, base, TaskArithmetic(), out=out)
    with pytest.raises(RuntimeError, match="boom"):
        merge(experts, base, Exploding(), out=out, overwrite=True)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    merge(experts, base, Linear(), out=out, overwrite=True)
    assert torch.equal(
        load_file(out / "model.safetensors")["layers.0.bias"],
        (experts[0]["layers.0.bias"] + experts[1]["layers.0.bias"]) / 2,
    )


def test_strategy_requiring_a_base_says_so():
    _, experts = make_models(2)
    with pytest.raises(ValueError, match="'task_arithmetic' needs a base model"):
        merge(experts, strategy=TaskArithmetic())
    with pytest.raises(TypeError, match="must be a list"):
        merge(experts[0], strategy=Linear())


def test_threads_give_identical_results():
    base, experts = make_models(3)
    one = merge(experts, base, Ties(density=0.3), threads=1)
    two = merge(experts, base, Ties(density=0.3), threads=2)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_strategy_objects_are_plain_dataclasses():
    s = Strategy.from_dict({"name": "ties", "density": [0.1, 0.2], "weights": [1, 2]})
    assert s.density == [0.1, 0.2] and s.to_dict()["weights"] == [1, 2]


class FisherWeighted(Linear):
    name = "fisher_weighted_test_strategy"
    requires = ("fisher",)

    def merge_tensor(self, name, base, tensors, stats):
        fs = [s["fisher"] for s in stats]
        return sum(f * t for f, t in zip(fs, tensors)) / sum(fs)


def test_statistics_reach_the_strategy_and_missing_ones_follow_the_policy():
    from lightning_merge import StatisticsError

    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    fa, fb = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    ea = Expert(a, statistics={"fisher": {"w": fa}}, name="a")
    eb = Expert(b, statistics={"fisher": {"w": fb}}, name="b")
    got = merge([ea, eb], strategy=FisherWeighted())
    torch.testing.assert_close(got["w"], (fa * a["w"] + fb * b["w"]) / (fa + fb))
    assert torch.equal(got["b"], torch.tensor([2.0]))  # no expert has a statistic for 'b': uniform
    with pytest.raises(StatisticsError, match=r"expert 'plain' has no 'fisher' statistics.*on_missing_statistic"):
        merge([ea, Expert(b, name="plain")], strategy=FisherWeighted())
    got = merge([ea, Expert(b, name="plain")], strategy=FisherWeighted(), on_missing_statistic="uniform")
    torch.testing.assert_close(got["w"], (fa * a["w"] + b["w"]) / (fa + 1))
    bad = Expert(b, statistics={"fisher": {"w": torch.ones(3)}}, name="bad")
    with pytest.raises(StatisticsError, match="has shape \\[3\\], the tensor \\[2\\]"):
        merge([ea, bad], strategy=FisherWeighted())
