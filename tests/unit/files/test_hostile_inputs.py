"""Hostile and unlucky inputs: each is refused (or warned about) with one clear message naming the file, tensor or
option and what to do, never accepted silently and never a traceback on the command line.

Every case here failed before the hardening work: it was accepted silently (a header read as weights, a NaN spread
through a merge, a negative statistic clamped away, an input overwritten) or refused with a traceback or an
unrelated message. ``test_the_table_is_what_the_note_reports`` counts them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import family

from lightning_merge import OTA, ContinualState, Expert, Fisher, Linear, Statistics, Ties, merge
from lightning_merge.cli.commands import main as cli
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import write_statistics
from lightning_merge.tools.averaging import average_checkpoints

CLEAR = (ValueError, FileNotFoundError, FileExistsError, TypeError)


def raw_safetensors(path: Path, header: object, data: bytes = b"\0" * 64) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def stats_file(path: Path, kinds: dict, values: dict) -> Path:
    write_statistics(path, values, kinds)
    return path


# -- the cases: (name, callable(tmp_path), expected message) ------------------------------------------------------


def _negative_offsets(t):
    return Expert(raw_safetensors(t / "m.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}))


def _overlapping_offsets(t):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    return Expert(raw_safetensors(t / "m.safetensors", header))


def _same_name_in_two_shards(t):
    (t / "m").mkdir()
    save_tensors(t / "m" / "model-00001-of-00002.safetensors", {"w": torch.zeros(2)})
    save_tensors(t / "m" / "model-00002-of-00002.safetensors", {"w": torch.ones(2)})
    return Expert(t / "m")


def _several_models_in_a_folder(t):
    (t / "m").mkdir()
    save_tensors(t / "m" / "base.safetensors", {"w": torch.zeros(2)})
    save_tensors(t / "m" / "expert.safetensors", {"w": torch.ones(2)})
    return Expert(t / "m")


def _header_is_a_list(t):
    return Expert(raw_safetensors(t / "m.safetensors", [1, 2, 3]))


def _entry_not_an_object(t):
    return Expert(raw_safetensors(t / "m.safetensors", {"w": 5}))


def _shape_not_a_list(t):
    return Expert(raw_safetensors(t / "m.safetensors", {"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}))


def _missing_data_offsets(t):
    return Expert(raw_safetensors(t / "m.safetensors", {"w": {"dtype": "F32", "shape": [2]}}))


def _declared_bytes_exceed_the_file(t):
    header = {"w": {"dtype": "F32", "shape": [1 << 18, 1 << 18], "data_offsets": [0, 1 << 38]}}
    return Expert(raw_safetensors(t / "m.safetensors", header, b"\0" * 4))


def _symlink_loop_in_a_folder(t):
    (t / "m").mkdir()
    os.symlink("loop.safetensors", t / "m" / "loop.safetensors")
    return Expert(t / "m")


def _ckpt_declaring_more_than_its_data(t):
    big = torch.zeros(1).as_strided((1 << 18, 1 << 18), (0, 0))
    torch.save({"state_dict": {"w": big}}, t / "m.ckpt")
    return Expert(t / "m.ckpt")


def _ckpt_random_bytes(t):
    (t / "m.ckpt").write_bytes(os.urandom(4096))
    return Expert(t / "m.ckpt")


def _ckpt_empty(t):
    (t / "m.ckpt").write_bytes(b"")
    return Expert(t / "m.ckpt")


def _ckpt_half_cut(t):
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, t / "full.ckpt")
    data = (t / "full.ckpt").read_bytes()
    (t / "m.ckpt").write_bytes(data[: len(data) // 2])
    return Expert(t / "m.ckpt")


class _Custom:
    pass


def _ckpt_raw_pickle(t):
    with open(t / "m.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(2)}, "obj": _Custom()}, f)
    return Expert(t / "m.ckpt")


def _ckpt_custom_object(t):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"obj": _Custom()}}, t / "m.ckpt")
    return Expert(t / "m.ckpt")


def _nan_weights_linear(t):
    base, paths = family(t, stats=False)
    save_tensors(t / "nan.safetensors", {"w": torch.full((4, 4), float("nan")), "b": torch.zeros(4)})
    return merge([paths[0], t / "nan.safetensors"], base, Linear())


def _inf_weights_ties(t):
    base, paths = family(t, stats=False)
    save_tensors(t / "inf.safetensors", {"w": torch.full((4, 4), float("inf")), "b": torch.zeros(4)})
    return merge([paths[0], t / "inf.safetensors"], base, Ties())


def _nan_fisher(t):
    base, paths = family(t)
    values = {"fisher.example": {"w": torch.full((4, 4), float("nan")), "b": torch.ones(4)}}
    stats_file(t / "e1.statistics.safetensors", {"fisher.example": {"count": 4}}, values)
    return merge(paths, base, Fisher())


def _inf_in_average_inputs(t):
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, t / "a.ckpt")
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("inf")])}, "global_step": 2}, t / "b.ckpt")
    return average_checkpoints([t / "a.ckpt", t / "b.ckpt"], t / "avg.ckpt")


def _nan_in_continual_add(t):
    base, paths = family(t, stats=False)
    state = ContinualState.create(t / "state", base=base, strategy=Linear())
    state.add(paths[0])
    save_tensors(t / "nan.safetensors", {"w": torch.full((4, 4), float("nan")), "b": torch.zeros(4)})
    try:
        return state.add(t / "nan.safetensors")
    finally:
        assert state.count == 1


def _negative_second_moments(t):
    base, paths = family(t)
    stats_file(t / "e1.statistics.safetensors", {"exp_avg_sq": {"beta2": 0.999, "step": 10}},
               {"exp_avg_sq": {"w": -torch.ones(4, 4), "b": torch.ones(4)}})
    return merge(paths, base, OTA())


def _negative_fisher(t):
    base, paths = family(t)
    stats_file(t / "e1.statistics.safetensors", {"fisher.example": {"count": 4}},
               {"fisher.example": {"w": -torch.ones(4, 4), "b": torch.ones(4)}})
    return merge(paths, base, Fisher())


def _negative_batch_size(t):
    return Statistics.load(stats_file(t / "s.safetensors", {"fisher.batch": {"count": 4, "batch_size": -64}},
                                      {"fisher.batch": {"w": torch.ones(2)}}))


def _beta2_one(t):
    return Statistics.load(stats_file(t / "s.safetensors", {"exp_avg_sq": {"beta2": 1.0, "step": 10}},
                                      {"exp_avg_sq": {"w": torch.ones(2)}}))


def _broadcastable_statistic_in_continual(t):
    base, paths = family(t)
    stats_file(t / "e1.statistics.safetensors", {"fisher.example": {"count": 4}},
               {"fisher.example": {"w": torch.ones(4, 1), "b": torch.ones(4)}})
    state = ContinualState.create(t / "state", base=base, strategy=Fisher())
    state.add(paths[0])
    return state.add(paths[1])


def _step_zero_second_moments(t):
    base, paths = family(t)
    stats_file(t / "e1.statistics.safetensors", {"exp_avg_sq": {"beta2": 0.999, "step": {"w": 0, "b": 5}}},
               {"exp_avg_sq": {"w": torch.ones(4, 4), "b": torch.ones(4)}})
    return merge(paths, base, OTA())


def _missing_current_generation(t):
    base, paths = family(t, stats=False)
    state = ContinualState.create(t / "state", base=base, strategy=Linear())
    state.add(paths[0])
    state.add(paths[1])
    shutil.rmtree(state.current)
    return ContinualState(t / "state").add(paths[0], allow_duplicate=True)


def _base_replaced_after_init(t):
    base, paths = family(t, stats=False)
    state = ContinualState.create(t / "state", base=base, strategy=Linear())
    save_tensors(base, {"w": torch.zeros(4, 4), "b": torch.zeros(4)})
    return state.add(paths[0])


def _unrelated_model_in_continual(t):
    base, paths = family(t, stats=False)
    state = ContinualState.create(t / "state", base=base, strategy=Linear())
    state.add(paths[0])
    state.add(paths[1])
    save_tensors(t / "unrelated.safetensors", {"w": 10 * torch.randn(4, 4), "b": 10 * torch.randn(4)})
    try:
        return state.add(t / "unrelated.safetensors")
    finally:
        assert state.count == 2


def _overwrite_the_base(t):
    base, paths = family(t, stats=False)
    return merge(paths, base, Linear(), out=base, overwrite=True)


def _overwrite_an_expert_folder(t):
    base, _ = family(t, stats=False)
    (t / "expert").mkdir()
    source = Expert(base)
    save_tensors(t / "expert" / "model.safetensors", {k: source.tensor(k) for k in source.names()})
    write_statistics(t / "expert" / "statistics.safetensors", {"fisher.example": {"w": torch.ones(4, 4)}},
                     {"fisher.example": {"count": 1}})
    return merge([t / "expert", base], base, Linear(), out=t / "expert", overwrite=True)


def _overwrite_an_average_input(t):
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, t / "a.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, t / "b.ckpt")
    return average_checkpoints([t / "a.ckpt", t / "b.ckpt"], t / "b.ckpt", overwrite=True)


def _output_symlink_loop(t):
    base, paths = family(t, stats=False)
    os.symlink("out", t / "out")
    return merge(paths, base, Linear(), out=t / "out", overwrite=True)


def _output_under_a_file(t):
    base, paths = family(t, stats=False)
    (t / "file").write_text("x")
    return merge(paths, base, Linear(), out=t / "file" / "out")


def _output_folder_where_a_file_is_asked(t):
    base, paths = family(t, stats=False)
    (t / "out.safetensors").mkdir()
    return merge(paths, base, Linear(), out=t / "out.safetensors", overwrite=True)


def _output_pt_suffix(t):
    base, paths = family(t, stats=False)
    return merge(paths, base, Linear(), out=t / "merged.pt")


def _adapter(t, config: object = None, drop_b: bool = False, rank_b: int = 2):
    base = t / "base"
    base.mkdir()
    save_tensors(base / "model.safetensors", {"layer.weight": torch.zeros(4, 6)})
    folder = t / "adapter"
    folder.mkdir()
    text = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}) if config is None else config
    (folder / "adapter_config.json").write_text(text)
    tensors = {"base_model.model.layer.lora_A.weight": torch.ones(2, 6)}
    if not drop_b:
        tensors["base_model.model.layer.lora_B.weight"] = torch.ones(4, rank_b)
    save_tensors(folder / "adapter_model.safetensors", tensors)
    return Expert(folder, base=base)


def _adapter_invalid_config(t):
    return _adapter(t, config="{not json")


def _adapter_missing_lora_b(t):
    return _adapter(t, drop_b=True)


def _adapter_rank_mismatch(t):
    return _adapter(t, rank_b=3)


def _continual_invalid_state_json(t):
    base, _ = family(t, stats=False)
    ContinualState.create(t / "state", base=base, strategy=Linear())
    (t / "state" / "state.json").write_text("{broken")
    return ContinualState(t / "state")


def _continual_truncated_running(t):
    base, paths = family(t, stats=False)
    state = ContinualState.create(t / "state", base=base, strategy=Linear())
    state.add(paths[0])
    running = state.current / "running.safetensors"
    running.write_bytes(running.read_bytes()[:40])
    return state.add(paths[1])


def _continual_non_broadcastable_statistic(t):
    base, paths = family(t)
    stats_file(t / "e0.statistics.safetensors", {"fisher.example": {"count": 4}},
               {"fisher.example": {"w": torch.ones(3, 5), "b": torch.ones(4)}})
    state = ContinualState.create(t / "state", base=base, strategy=Fisher())
    return state.add(paths[0])


CASES: list[tuple[str, Callable, str]] = [
    ("safetensors: negative data_offsets", _negative_offsets, "m.safetensors.*do not form a byte range"),
    ("safetensors: overlapping data_offsets", _overlapping_offsets, "'a' and 'b' share bytes"),
    ("safetensors: one name in two shards", _same_name_in_two_shards, "tensor 'w' is in both"),
    ("safetensors: several models in one folder", _several_models_in_a_folder, "several safetensors files"),
    ("safetensors: header is a JSON list", _header_is_a_list, "header is a list, not an object"),
    ("safetensors: entry is not an object", _entry_not_an_object, "tensor 'w' is described by a int"),
    ("safetensors: shape is not a list", _shape_not_a_list, "tensor 'w' has shape '2'"),
    ("safetensors: no data_offsets", _missing_data_offsets, "tensor 'w' has data_offsets None"),
    ("safetensors: declared bytes exceed the file", _declared_bytes_exceed_the_file, "ends at byte"),
    ("folder: a symbolic link loop", _symlink_loop_in_a_folder, "cannot list the weights of folder"),
    (".ckpt: a tensor declaring more than its data", _ckpt_declaring_more_than_its_data, "holds only"),
    (".ckpt: random bytes", _ckpt_random_bytes, "cannot load .*m.ckpt"),
    (".ckpt: empty file", _ckpt_empty, "m.ckpt' is empty"),
    (".ckpt: half-cut file", _ckpt_half_cut, "cannot load .*m.ckpt"),
    (".ckpt: a raw pickle", _ckpt_raw_pickle, "m.ckpt"),
    (".ckpt: a custom object", _ckpt_custom_object, "trust_checkpoint=True"),
    ("weights: NaN in a linear merge", _nan_weights_linear, "nan.safetensors': tensor 'w' has 16 NaN"),
    ("weights: inf in a TIES merge", _inf_weights_ties, "inf.safetensors': tensor 'w' has 16 NaN or infinite"),
    ("statistics: a NaN Fisher", _nan_fisher, "'fisher.example' statistic of tensor 'w' has 16 NaN"),
    ("average: an infinite weight", _inf_in_average_inputs, "b.ckpt': tensor 'w' has 1 NaN or infinite"),
    ("continual: NaN in an added expert", _nan_in_continual_add, "nan.safetensors': tensor 'w' has 16 NaN"),
    ("statistics: negative exp_avg_sq", _negative_second_moments, "'exp_avg_sq' statistic of tensor 'w' has 16 neg"),
    ("statistics: negative Fisher", _negative_fisher, "'fisher.example' statistic of tensor 'w' has 16 negative"),
    ("statistics: batch_size -64", _negative_batch_size, "fisher.batch.batch_size = -64"),
    ("statistics: beta2 = 1", _beta2_one, "exp_avg_sq.beta2 = 1.0"),
    ("continual: a broadcastable wrong-shaped statistic", _broadcastable_statistic_in_continual,
     "statistic of tensor 'w' has shape \\[4, 1\\], the tensor \\[4, 4\\]"),
    ("statistics: exp_avg_sq at step 0", _step_zero_second_moments, "tensor 'w' has exp_avg_sq recorded at optimizer "
                                                                     "step 0"),
    ("continual: the current generation is gone", _missing_current_generation, "current generation '000002' is "
                                                                                "missing"),
    ("continual: the base was replaced after init", _base_replaced_after_init, "changed since the state was created"),
    ("continual: an unrelated model (no statistics)", _unrelated_model_in_continual, "farther from the base than"),
    ("output: overwrite the base", _overwrite_the_base, "is an input of this merge"),
    ("output: overwrite an expert folder", _overwrite_an_expert_folder, "is an input of this merge"),
    ("output: average over one of its inputs", _overwrite_an_average_input, "is an input of this merge"),
    ("output: a symbolic link loop", _output_symlink_loop, "symbolic link loop"),
    ("output: under a file", _output_under_a_file, "which is a file, not a folder"),
    ("output: a folder where a file is asked", _output_folder_where_a_file_is_asked, "is a folder, and this output"),
    ("output: a .pt file", _output_pt_suffix, ".pt is not an output format"),
    ("adapter: invalid adapter_config.json", _adapter_invalid_config, "adapter_config.json is not valid JSON"),
    ("adapter: a missing lora_B", _adapter_missing_lora_b, "module 'layer' has lora_A but no lora_B"),
    ("adapter: A and B ranks disagree", _adapter_rank_mismatch, "lora_A of rank 2 .* but lora_B \\[4, 3\\]"),
    ("continual: an invalid state.json", _continual_invalid_state_json, "state.json' is not valid JSON"),
    ("continual: a truncated running.safetensors", _continual_truncated_running, "running quantities of generation"),
    ("continual: a non-broadcastable statistic", _continual_non_broadcastable_statistic,
     "statistic of tensor 'w' has shape \\[3, 5\\]"),
]


@pytest.mark.parametrize("name,fn,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(tmp_path, name, fn, match):
    with pytest.raises(CLEAR, match=match) as info:
        fn(tmp_path)
    message = str(info.value)
    assert "\n" not in message.strip() and len(message) < 600, message


CLI_CASES = [
    ("--set with invalid YAML", lambda t, r: ["merge", r, str(t / "o"), "--set", "density=[1,2"], "--set density"),
    ("--shard-size 5XB", lambda t, r: ["merge", r, str(t / "o"), "--shard-size", "5XB"], "shard size '5XB'"),
    ("recipe density: abc", lambda t, r: ["merge", str(_recipe(t, "abc")), str(t / "o")],
     "models\\[0\\].parameters.density must be a number"),
    ("a corrupted expert", lambda t, r: ["merge", str(_recipe(t, 0.5, corrupt=True)), str(t / "o")],
     "truncated or corrupted"),
    ("inspect a random file", lambda t, r: ["inspect", str(_random(t))], "cannot load"),
    ("average of a missing checkpoint", lambda t, r: ["average", str(t / "nope.ckpt"), "--out", str(t / "a.ckpt")],
     "nope.ckpt' does not exist"),
    ("continual add to a non-state", lambda t, r: ["continual", "add", str(t), str(t / "x")], "not a continual"),
]


def _random(t: Path) -> Path:
    (t / "random.ckpt").write_bytes(os.urandom(1000))
    return t / "random.ckpt"


def _recipe(t: Path, density: object, corrupt: bool = False) -> Path:
    base, paths = family(t, stats=False)
    if corrupt:
        paths[1].write_bytes(paths[1].read_bytes()[:30])
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": density}} for p in paths]}
    path = t / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize("name,args,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_the_command_line_reports_one_line_and_no_traceback(tmp_path, capsys, name, args, match):
    import re

    recipe = str(_recipe(tmp_path, 0.5)) if "recipe" not in name and "corrupted" not in name else ""
    code = cli(args(tmp_path, recipe))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lightning-merge: error: ") and "Traceback" not in err[0], err
    assert re.search(match, err[0]), err[0]


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert cli(["-v", "inspect", str(_random(tmp_path))]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_table_is_what_the_note_reports():
    assert len(CASES) + len(CLI_CASES) == 50


# -- fuzzing the readers -------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _valid_file(tmp: Path) -> bytes:
    save_tensors(tmp / "valid.safetensors", {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64),
                                             "c": torch.zeros(3, dtype=torch.bfloat16)})
    return (tmp / "valid.safetensors").read_bytes()


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_files_are_read_or_refused_clearly(tmp_path, data):
    raw = bytearray(_valid_file(tmp_path))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind in ("truncate", "flip"):
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(max_size=16))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(raw))
    try:
        expert = Expert(path)
    except ValueError as err:  # SafetensorsError is a ValueError: one line naming the file
        assert "fuzzed.safetensors" in str(err) and "\n" not in str(err)
        return
    for name in expert.names():  # whatever opens reads exactly what its header declares
        spec = expert.spec(name)
        value = expert.tensor(name)
        assert tuple(value.shape) == spec.shape and value.dtype == spec.dtype


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_checkpoints_are_read_or_refused_clearly(tmp_path, data):
    torch.save({"state_dict": {"w": torch.randn(8, 8)}, "epoch": 1}, tmp_path / "valid.ckpt")
    raw = bytearray((tmp_path / "valid.ckpt").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()) and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzzed.ckpt"
    path.write_bytes(bytes(raw))
    try:
        expert = Expert(path)
    except ValueError as err:
        assert "fuzzed.ckpt" in str(err)
        return
    for name in expert.names():
        assert expert.tensor(name).numel() == expert.spec(name).numel
