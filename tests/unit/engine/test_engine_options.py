"""The engine's single mechanisms: options checked once (MergeOptions), the typed dry run, one include/exclude rule on
every merge path, one Lightning checkpoint writer, the Writer protocol."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import Linear, TaskArithmetic, merge, prepare
from lightning_merge.engine.options import MergeOptions, selects
from lightning_merge.engine.outputs import DryRun, TensorCounts
from lightning_merge.engine.writers import (
    CheckpointWriter,
    DictWriter,
    ModuleWriter,
    SafetensorsWriter,
    SharedOutput,
    Writer,
)
from lightning_merge.files.checkpoint import TRAINING_STATE, write_checkpoint
from lightning_merge.files.safetensors import TensorSpec


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"body.weight": torch.randn(3, 2, generator=g), "head.weight": torch.randn(2, 3, generator=g),
            "steps": torch.tensor(4)}


def _files(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"m{i}.safetensors"
        save_file(_state(i), path)
        paths.append(path)
    return paths


# -- MergeOptions --------------------------------------------------------------------------------------------------


def test_merge_options_are_normalised_once_and_frozen():
    options = MergeOptions(include="body.*", exclude=["head.*"], dtype="bf16", shard_size="2KB", threads=3)
    assert options.include == ("body.*",) and options.exclude == ("head.*",)
    assert options.dtype is torch.bfloat16 and options.shard_size == 2048 and options.plan_dtype is torch.bfloat16
    assert MergeOptions(output="peft", dtype="fp16").plan_dtype is torch.float32  # adapters are factored in float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.include = None  # type: ignore[misc]
    assert options.replace(overwrite=True).overwrite and not options.overwrite
    for bad, match in ((dict(on_missing="all"), "on_missing must be one of error, union, intersection, base"),
                       (dict(on_missing_statistic="zero"), "on_missing_statistic must be one of error, uniform"),
                       (dict(output="lora"), "output must be None or 'peft'"),
                       (dict(threads=0), "threads must be a positive integer"),
                       (dict(rank=4), "rank= applies to output='peft' only"),
                       (dict(shard_size="lots"), "shard size 'lots' is not a size"),
                       (dict(dtype="int8"), "dtype 'int8' is not a floating dtype")):
        with pytest.raises(ValueError, match=match):
            MergeOptions(**bad)
    with pytest.raises(TypeError, match="include patterns must be strings"):
        MergeOptions(include=[3])


def test_prepare_checks_on_missing_statistic_like_merge(tmp_path):
    """prepare() used to take any on_missing_statistic and treat an unknown one as 'uniform'."""
    paths = _files(tmp_path)
    with pytest.raises(ValueError, match="on_missing_statistic must be one of error, uniform, got 'unifrom'"):
        prepare(paths[1:], paths[0], TaskArithmetic(), on_missing_statistic="unifrom")
    with pytest.raises(ValueError, match="on_missing_statistic must be one of error, uniform, got 'unifrom'"):
        merge(paths[1:], paths[0], TaskArithmetic(), on_missing_statistic="unifrom")


def test_a_strategy_that_needs_a_base_is_refused_by_merge_dry_run_and_prepare_alike(tmp_path):
    paths = _files(tmp_path)
    for call in (lambda: merge(paths, None, TaskArithmetic()), lambda: merge(paths, None, TaskArithmetic(),
                                                                              dry_run=True),
                 lambda: prepare(paths, None, TaskArithmetic())):
        with pytest.raises(ValueError, match="strategy 'task_arithmetic' needs a base model"):
            call()


# -- the dry run ---------------------------------------------------------------------------------------------------


def test_dry_run_returns_a_frozen_typed_plan(tmp_path):
    paths = _files(tmp_path)
    plan = merge(paths[1:], paths[0], TaskArithmetic(), out=tmp_path / "out", include=["body.*"], dtype="bf16",
                 dry_run=True)
    assert isinstance(plan, DryRun)
    assert plan.tensors == TensorCounts(merge=1, copy=1, non_floating=1)
    assert plan.experts == (str(paths[1]), str(paths[2])) and plan.base == str(paths[0])
    assert plan.parameters == 3 * 2 + 2 * 3 + 1
    assert plan.output_bytes == (3 * 2 + 2 * 3) * 2 + 8  # bf16 floats, the int64 counter as stored
    assert plan.output_kind == "files" and plan.output == str(tmp_path / "out") and not plan.output_exists
    assert plan.statistics == ({}, {}) and plan.global_pass is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.base = None  # type: ignore[misc]
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["tensors"] == {"merge": 1, "copy": 1, "non_floating": 1} and data["experts"] == list(plan.experts)
    assert not (tmp_path / "out").exists()


# -- one include/exclude rule --------------------------------------------------------------------------------------


def test_one_include_rule_selects_nothing_for_an_empty_include():
    assert selects("a.weight", None, None) and selects("a.weight", "a.*", None)
    assert not selects("a.weight", [], None) and not selects("a.weight", (), None)
    assert selects("a.weight", None, []) and not selects("a.weight", ["a.*"], ["*.weight"])
    assert not selects("a.weight", "b.*", None)


def test_an_empty_include_is_refused_on_every_merge_path(tmp_path):
    """merge() refuses include=[] (it selects nothing); the callbacks used to read it as 'every tensor'."""
    pytest.importorskip("lightning")
    from lightning_merge.callbacks import CheckpointAveraging, MergeOnFitEnd
    from lightning_merge.callbacks._checks import selected
    from lightning_merge.tools.averaging import average_checkpoints

    paths = _files(tmp_path)
    with pytest.raises(ValueError, match=r"include=\[\] and exclude=None leave no floating-point tensor to merge"):
        merge(paths, strategy=Linear(), include=[])
    ckpts = []
    for i in range(2):
        torch.save({"state_dict": _state(i), "global_step": i}, tmp_path / f"c{i}.ckpt")
        ckpts.append(str(tmp_path / f"c{i}.ckpt"))
    with pytest.raises(ValueError, match=r"include=\[\] and exclude=None leave no floating-point tensor to merge"):
        average_checkpoints(ckpts, include=[])
    with pytest.raises(ValueError, match=r"MergeOnFitEnd: include=\[\] selects no tensor"):
        MergeOnFitEnd(experts=[str(paths[1])], strategy=Linear(), include=[])
    with pytest.raises(ValueError, match=r"CheckpointAveraging: include=\[\] selects no tensor"):
        CheckpointAveraging(include=[])
    assert not selected("body.weight", [], None) and selected("body.weight", None, [])
    # one pattern as a string is one pattern on the callbacks' path too (it used to become its characters)
    callback = MergeOnFitEnd(experts=[str(paths[1])], strategy=Linear(), include="body.*", exclude=[])
    assert callback.include == ("body.*",) and callback.exclude == ()


# -- one Lightning checkpoint writer -------------------------------------------------------------------------------


def test_write_checkpoint_keeps_the_template_drops_training_state_and_records(tmp_path):
    template = {"epoch": 2, "state_dict": {"old": torch.zeros(1)}, "optimizer_states": [{}], "lr_schedulers": [],
                "loops": {}, "hyper_parameters": {"lr": 0.5}}
    out = write_checkpoint(tmp_path / "a.ckpt", {"w": torch.ones(2)}, {"by": "test"}, template=template,
                           drop=TRAINING_STATE)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["epoch", "state_dict", "hyper_parameters", "lightning_merge"]
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and "old" not in loaded["state_dict"]
    assert loaded["lightning_merge"] == {"by": "test"} and loaded["hyper_parameters"] == {"lr": 0.5}
    fresh = torch.load(write_checkpoint(tmp_path / "b.ckpt", {}, None), weights_only=True)
    assert list(fresh) == ["pytorch-lightning_version", "epoch", "global_step", "state_dict", "lightning_merge"]
    assert fresh["epoch"] == 0 and fresh["global_step"] == 0
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "b.ckpt", {}, None)  # replace="never" by default


def test_every_checkpoint_output_goes_through_the_one_writer(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import types

    import lightning_merge.files.checkpoint as checkpoint
    from lightning_merge.callbacks import MergeOnFitEnd
    from lightning_merge.tools.averaging import average_checkpoints

    records: list[dict] = []  # what each checkpoint saved through files.checkpoint.write_checkpoint records
    real = checkpoint.save_torch_file
    monkeypatch.setattr(checkpoint, "save_torch_file",
                        lambda obj, tmp: records.append(obj["lightning_merge"]) or real(obj, tmp))
    paths = _files(tmp_path)
    merge(paths, strategy=Linear(), out=tmp_path / "merged.ckpt")
    ckpts = []
    for i in range(2):
        torch.save({"state_dict": _state(i), "global_step": i}, tmp_path / f"c{i}.ckpt")
        ckpts.append(str(tmp_path / f"c{i}.ckpt"))
    average_checkpoints(ckpts, tmp_path / "avg.ckpt")
    callback = MergeOnFitEnd(experts=[str(paths[1])], strategy=Linear(), out=str(tmp_path / "fit.ckpt"))
    trainer = types.SimpleNamespace(current_epoch=1, global_step=5)
    module = types.SimpleNamespace(hparams={"lr": 0.1}, CHECKPOINT_HYPER_PARAMS_KEY="hyper_parameters")
    callback._save_checkpoint(_state(0), tmp_path / "fit.ckpt", trainer, module)
    assert len(records) == 3 and records[0]["library"] == "lightning-merge"  # the engine's provenance
    assert records[1]["weighting"] == "uniform" and records[2]["experts"][0] == "<trained>"
    fit = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    assert (fit["epoch"], fit["global_step"], fit["hyper_parameters"]) == (1, 5, {"lr": 0.1})
    assert fit["lightning_merge"]["experts"] == ["<trained>", str(paths[1])]


# -- the Writer protocol -------------------------------------------------------------------------------------------


def test_every_writer_implements_the_protocol(tmp_path):
    module = torch.nn.Linear(2, 2)
    writers = [DictWriter(["a"]), ModuleWriter(module, ["weight", "bias"]),
               SafetensorsWriter(tmp_path / "s.safetensors", [("a", TensorSpec((2,), torch.float32))],
                                 single_file=True),
               CheckpointWriter(tmp_path / "c.ckpt", template=None, prefix="", provenance={}, overwrite=False)]
    for writer in writers:
        assert isinstance(writer, Writer)
    # the outputs ranks of a distributed merge write together: safetensors (and PEFT adapters), nothing else
    assert [isinstance(w, SharedOutput) for w in writers] == [False, False, True, False]
    writers[0].write("a", torch.ones(1))
    assert list(writers[0].finish()) == ["a"]
    writers[2].abort()
    assert not list(tmp_path.iterdir())
