"""The quiet cases of issue 27 (items 7-9) and what probing beyond them found: inputs that were merged without a word
into a wrong model (an infinity, one expert's weights, a zero model, a copy of the base, a dropped or replaced
tensor, a wrong LoRA scaling). Each is now refused with the error class and a message naming the tensor, expert,
file or argument and what to do, or (where a right answer exists) merged right; every test here failed before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_merge import (
    OTA,
    ContinualState,
    Expert,
    Fisher,
    Linear,
    StatisticsError,
    TaskArithmetic,
    Ties,
    WeightedMedian,
    merge,
)
from lightning_merge.cli.commands import main as cli
from lightning_merge.files.finite import DtypeRangeError, dtype_limit
from lightning_merge.files.safetensors import SafetensorsError, save_tensors
from lightning_merge.formats.lora import AdapterError
from lightning_merge.formats.sidecar import sidecar_path, write_statistics
from lightning_merge.tools.averaging import average_checkpoints
from lightning_merge.tools.evaluation import sweep_scale
from lightning_merge.tools.recipe import RecipeError, load_recipe
from lightning_merge.tools.tall import compress


def fp16_family(root: Path, value: float = 40000.0) -> tuple[Path, list[Path]]:
    """A float16 base of zeros and two experts with one entry at ``value`` (their sum overflows float16)."""
    save_tensors(root / "base.safetensors", {"w": torch.zeros(2, 3, dtype=torch.float16),
                                             "b": torch.zeros(3, dtype=torch.float16)})
    paths = []
    for i in range(2):
        w = torch.zeros(2, 3)
        w[1, 2] = value
        w[0, 0] = 0.5 + i
        save_tensors(root / f"e{i}.safetensors", {"w": w.to(torch.float16), "b": torch.full((3,), 0.25 * i,
                                                                                            dtype=torch.float16)})
        paths.append(root / f"e{i}.safetensors")
    return root / "base.safetensors", paths


# -- item 7: half-precision outputs that overflow ----------------------------------------------------------------------
def test_a_float16_output_that_overflows_is_refused_naming_tensor_dtype_and_magnitude(tmp_path):
    base, paths = fp16_family(tmp_path)
    with pytest.raises(DtypeRangeError, match=r"tensor 'w' does not fit float16: its largest magnitude is 80000, "
                                              r"above float16's largest value 65504, so it would be written as inf; "
                                              r"write it in bfloat16, float32 or float64 instead \(dtype= / --dtype\)"):
        merge(paths, base, TaskArithmetic(), out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # the remedy works: the same merge in bfloat16 holds 80000 (as bfloat16 rounds it)
    state = merge(paths, base, TaskArithmetic(), dtype="bfloat16")
    assert state["w"].dtype == torch.bfloat16 and float(state["w"][1, 2]) == float(torch.tensor(8e4).bfloat16())
    assert torch.isfinite(state["w"].float()).all()


def test_float32_values_beyond_bfloat16_and_copied_tensors_are_checked_too(tmp_path):
    # float32 holds 3.4e38, bfloat16 rounds anything from 3.3962e38 up to inf: the check is the cast's, not float32's
    big = {"w": torch.tensor([1.7e38, 1.0])}
    with pytest.raises(DtypeRangeError, match="tensor 'w' does not fit bfloat16: its largest magnitude is 3.4e"):
        merge([big, big], strategy=Linear(normalize=False), dtype="bfloat16")
    # a tensor excluded from the merge is copied, and its cast to the output dtype is checked as a merged one's
    base = {"w": torch.ones(3), "scale": torch.tensor([70000.0])}
    experts = [{"w": torch.full((3,), 2.0), "scale": torch.tensor([70000.0])}] * 2
    with pytest.raises(DtypeRangeError, match="tensor 'scale' does not fit float16: its largest magnitude is 70000"):
        merge(experts, base, TaskArithmetic(), exclude=["scale"], dtype="float16")
    # a float64 input beyond float32 (the merge's compute dtype) is named as that, not as a NaN or a corruption
    huge = {"w": torch.tensor([1e300, 1.0], dtype=torch.float64)}
    with pytest.raises(DtypeRangeError, match="expert 'huge': tensor 'w' does not fit float32: its largest magnitude "
                                              "is 1e\\+300.*merges compute in float32"):
        merge([Expert(huge, name="huge"), {"w": torch.ones(2, dtype=torch.float64)}], strategy=Linear())


def test_a_saturating_float8_output_is_refused_instead_of_clamped():
    e = {"w": torch.tensor([288.0, 1.0]).to(torch.float8_e4m3fn)}
    assert float(torch.tensor(576.0).to(torch.float8_e4m3fn)) == 448.0  # what used to be written, silently
    with pytest.raises(DtypeRangeError, match="does not fit float8_e4m3fn: its largest magnitude is 576.*clamped to "
                                              "448"):
        merge([e, e], strategy=Linear(normalize=False))


def test_the_range_limit_is_where_the_cast_stops_rounding_to_a_finite_value():
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e5m2):
        limit = torch.tensor(dtype_limit(dtype), dtype=torch.float32)
        below = torch.nextafter(limit, torch.tensor(0.0))
        assert math.isinf(float(limit.to(dtype))) and float(below.to(dtype)) == torch.finfo(dtype).max
    # 65519 is written as 65504 (rounding, accepted); 65520 would be inf (refused)
    ok = merge([{"w": torch.tensor([65519.0])}], strategy=Linear(), dtype="float16")
    assert float(ok["w"]) == 65504.0
    with pytest.raises(DtypeRangeError):
        merge([{"w": torch.tensor([65520.0])}], strategy=Linear(), dtype="float16")


def test_every_writer_path_that_casts_checks_the_cast(tmp_path):
    base, paths = fp16_family(tmp_path)
    # into a float16 module
    module = torch.nn.Linear(3, 2).half()
    experts = [{"weight": torch.full((2, 3), 40000.0), "bias": torch.zeros(2)}] * 2
    with pytest.raises(DtypeRangeError, match="tensor 'weight' does not fit float16.*module.float()"):
        merge(experts, strategy=Linear(normalize=False), out=module)
    # a continual state over a float16 base: the add is refused and nothing is committed
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear(normalize=False))
    state.add(paths[0])
    with pytest.raises(DtypeRangeError, match="tensor 'w' does not fit float16.*continual model is written in its "
                                              "base's dtype"):
        state.add(paths[1])
    assert ContinualState(tmp_path / "state").count == 1
    # TALL: the recovered expert θ₀ + m ⊙ τ_MTL takes the base's dtype
    tall = compress(paths, base, tmp_path / "tall", tall_lambda=0.2)
    with pytest.raises(DtypeRangeError, match="tensor 'w' does not fit float16.*recovered expert takes the base's"):
        tall.state_dict(0, base)
    # sweep_scale's states are rounded to the base's dtype like a merge's
    with pytest.raises(DtypeRangeError, match="tensor 'w' does not fit float16.*smaller scale"):
        sweep_scale(TaskArithmetic(), paths, base, lambda sd: 0.0, scales=[0.5, 1.0])


def test_the_command_line_says_which_dtype_to_use(tmp_path, capsys):
    base, paths = fp16_family(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(base),
                                  "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}))
    assert cli(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit float16" in err[0] and "--dtype" in err[0], err
    assert cli(["merge", str(recipe), str(tmp_path / "out"), "--dtype", "bf16"]) == 0


# -- item 8: a zero or tiny Fisher took all the weight ----------------------------------------------------------------
def fisher_experts(fishers, values=(1.0, 3.0), n=4):
    return [Expert({"w": torch.full((n,), v)}, statistics={"fisher": {"w": torch.full((n,), f)}}, name=f"e{i}")
            for i, (v, f) in enumerate(zip(values, fishers))]


def test_a_fisher_that_is_zero_everywhere_is_refused_naming_the_expert(tmp_path):
    base = {"w": torch.zeros(4)}
    experts = fisher_experts([0.0, 0.5])  # the case: merged to exactly e0 = 1
    for strategy in (Fisher(), Fisher(favor_target=True), TaskArithmetic(weighting="fisher"),
                     WeightedMedian(normalize=True)):
        with pytest.raises(StatisticsError, match="expert 'e0' has a 'fisher' statistic that is zero on every merged "
                                                  "tensor"):
            merge(experts, base, strategy)
    # without normalisation it is a precision like any other: the floor's weight only, the other expert wins
    got = merge(experts, base, Fisher(normalize=False))
    torch.testing.assert_close(got["w"], torch.full((4,), 3.0), rtol=1e-5, atol=1e-5)
    # the continual form refuses it too, before any work
    save_tensors(tmp_path / "base.safetensors", base)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=Fisher())
    save_tensors(tmp_path / "e0.safetensors", {"w": torch.ones(4)})
    write_statistics(sidecar_path(tmp_path / "e0.safetensors"), {"fisher.example": {"w": torch.zeros(4)}},
                     {"fisher.example": {"count": 8}})
    with pytest.raises(StatisticsError, match="e0.safetensors' has a 'fisher' statistic that is zero"):
        state.add(tmp_path / "e0.safetensors")
    assert state.count == 0


def test_a_fisher_below_the_floor_no_longer_takes_all_the_weight(tmp_path):
    """Normalising by the raw ‖F‖ and then flooring gave an expert whose Fisher lies below the floor a weight of
    floor/‖F‖: all of it. The norm is now the floored precision's, so such an expert weighs as a uniform Fisher."""
    base = {"w": torch.zeros(4)}
    experts = fisher_experts([1e-20, 0.5])  # both are uniform Fishers after the floor: the plain average
    for strategy in (Fisher(), TaskArithmetic(weighting="fisher")):
        torch.testing.assert_close(merge(experts, base, strategy)["w"], torch.full((4,), 2.0))
    # the continual form folds the same precisions: one path, one answer
    save_tensors(tmp_path / "base.safetensors", base)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=Fisher())
    for i, (value, fisher) in enumerate(((1.0, 1e-20), (3.0, 0.5))):
        path = tmp_path / f"e{i}.safetensors"
        save_tensors(path, {"w": torch.full((4,), value)})
        write_statistics(sidecar_path(path), {"fisher.example": {"w": torch.full((4,), fisher)}},
                         {"fisher.example": {"count": 8}})
        state.add(path)
    torch.testing.assert_close(state.state_dict()["w"], torch.full((4,), 2.0))


def _reference_fisher_merge(thetas, fishers, coefficients, floor, favor_target):
    """mmatena/model_merging's merge of one variable, written out: coefficients divided by the raw Fisher's norm over
    every variable, the floor on the target's Fisher (or every Fisher), Σ c F θ / Σ c F."""
    norms = [math.sqrt(sum(float((f.double() ** 2).sum()) for f in fs.values())) for fs in fishers]
    coefficients = [c / n for c, n in zip(coefficients, norms)]
    out = {}
    for name in thetas[0]:
        lhs, rhs = [], []
        for j, (theta, fs, c) in enumerate(zip(thetas, fishers, coefficients)):
            diag = fs[name]
            if not favor_target or j == 0:
                diag = torch.maximum(diag, torch.tensor(floor))
            lhs.append(c * diag)
            rhs.append(c * diag * theta[name])
        out[name] = torch.stack(rhs).sum(0) / torch.stack(lhs).sum(0)
    return out


@pytest.mark.parametrize("favor_target", [False, True])
def test_fisher_keeps_parity_with_the_reference_where_fishers_are_above_the_floor(favor_target):
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (6, 5), "b": (7,)}
    thetas = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    fishers = [{k: torch.rand(s, generator=g) * 10 ** (i - 2) + 1e-5 for k, s in shapes.items()} for i in range(3)]
    want = _reference_fisher_merge(thetas, fishers, [1.0, 0.5, 2.0], 1e-6, favor_target)
    experts = [Expert(t, statistics={"fisher": f}) for t, f in zip(thetas, fishers)]
    got = merge(experts, strategy=Fisher(weights=[1.0, 0.5, 2.0], favor_target=favor_target))
    for k in shapes:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1.2e-6 * float(want[k].abs().max()))


def test_a_precision_weighted_merge_without_a_base_never_zeroes_an_unweighted_entry():
    """Fisher(floor=0) or OTA(eps=0) where no expert has any curvature (a frozen layer): the quotient 0/0 was written
    as 0. Without a base it is now the λ-weighted mean of the experts there: θ₀ itself where they kept it frozen."""
    frozen = torch.tensor([5.0, 5.0])
    experts = [Expert({"w": torch.cat([frozen, torch.tensor([float(i)])])},
                      statistics={"fisher": {"w": torch.tensor([0.0, 0.0, 1.0 + i])},
                                  "exp_avg_sq": {"w": torch.tensor([0.0, 0.0, 1.0 + i])}}) for i in range(2)]
    fisher = merge(experts, strategy=Fisher(floor=0.0, normalize=False, weights=[1.0, 3.0]))["w"]
    torch.testing.assert_close(fisher, torch.tensor([5.0, 5.0, 6.0 / 7.0]))
    ota = merge(experts, strategy=OTA(eps=0.0))["w"]
    torch.testing.assert_close(ota[:2], frozen)
    moved = [Expert({"w": torch.tensor([1.0])}, statistics={"fisher": {"w": torch.zeros(1)}}),
             Expert({"w": torch.tensor([4.0])}, statistics={"fisher": {"w": torch.zeros(1)}})]
    assert float(merge(moved, strategy=Fisher(floor=0.0, normalize=False, weights=[2.0, 1.0]))["w"]) == 2.0


def test_precision_weights_must_be_non_negative_and_not_all_zero(tmp_path):
    for make in (lambda w: Fisher(weights=w), lambda w: OTA(weights=w), lambda w: WeightedMedian(weights=w),
                 lambda w: Ties(weights=w, weighting="ota")):
        with pytest.raises(ValueError, match=r"weights must be in \[0, inf\], got -1"):
            make([1.0, -1.0])
        with pytest.raises(ValueError, match="weights are all 0: no expert would have any weight"):
            make([0.0, 0.0])
    Fisher(weights=[0.0, 1.0])  # leaving one expert out is fine
    # a continual state refuses an add whose experts so far all weigh 0 (its model would be the base)
    base, paths = fp16_family(tmp_path, value=1.0)
    for path in paths:
        write_statistics(sidecar_path(path), {"fisher.example": {"w": torch.ones(2, 3), "b": torch.ones(3)}},
                         {"fisher.example": {"count": 8}})
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Fisher(weights=[0.0, 1.0]))
    with pytest.raises(ValueError, match="weights of the experts added so far, this one included, are all 0"):
        state.add(paths[0])
    assert state.count == 0


# -- item 9: weights that cancel, patterns that match nothing, readers that kept one of two ---------------------------
@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [0.1, 0.2, -0.3], 0.0])
def test_normalised_weights_that_sum_to_zero_are_refused_at_construction(weights):
    with pytest.raises(ValueError, match=r"Linear.weights.* sum to .*normalize=True divides by their sum"):
        Linear(weights=weights)
    with pytest.raises(ValueError, match=r"TaskArithmetic.weights.* sum to "):
        TaskArithmetic(weights=weights, normalize=True)
    assert Linear(weights=weights, normalize=False).linear_form(3 if weights == [0.1, 0.2, -0.3] else 2) is not None


def test_weights_that_cancel_are_refused_in_recipes_continual_states_and_averages(tmp_path):
    base, paths = fp16_family(tmp_path, value=1.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, (1.0, -1.0))]}))
    with pytest.raises(RecipeError, match=r"r.yaml: Linear.weights \[1, -1\] sum to 0"):
        load_recipe(recipe)
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {paths[0]}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {paths[1]}\n    parameters: {{weight: .nan}}\n")
    with pytest.raises(RecipeError, match="Linear.weights must be finite, got nan"):
        load_recipe(recipe)
    # a continual state: the model after each add is the normalised average of the experts so far
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear(weights=[1.0, -1.0, 1.0]))
    state.add(paths[0])
    with pytest.raises(ValueError, match=r"Linear.weights \[1, -1\] sum to 0.*experts added so far"):
        state.add(paths[1])
    assert state.count == 1
    # averaging checkpoints with explicit weights
    for i in range(2):
        torch.save({"state_dict": {"w": torch.full((2,), float(i))}, "global_step": i}, tmp_path / f"c{i}.ckpt")
    cks = [tmp_path / "c0.ckpt", tmp_path / "c1.ckpt"]
    with pytest.raises(ValueError, match=r"average_checkpoints.weights \[1, -1\] sum to 0"):
        average_checkpoints(cks, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="average_checkpoints.weights must be finite"):
        average_checkpoints(cks, weights=[1.0, float("inf")])
    state_dict, ws = average_checkpoints(cks, weights=[1.0, 3.0])
    assert ws == [0.25, 0.75] and torch.equal(state_dict["w"], torch.full((2,), 0.75))


def test_include_and_exclude_patterns_that_match_nothing_are_refused(tmp_path):
    experts = [{"layers.0.weight": torch.ones(2) * i, "layers.0.bias": torch.ones(2), "step": torch.tensor(3)}
               for i in range(2)]
    with pytest.raises(ValueError, match=r"include pattern 'layers.0' matches no tensor \(tensors are named like "
                                         r"'layers.0.weight', 'layers.0.bias', 'step'\)"):
        merge(experts, strategy=Linear(), include=["layers.0"])
    with pytest.raises(ValueError, match="exclude pattern 'layer.0.bias' matches no tensor"):
        merge(experts, strategy=Linear(), exclude=["layer.0.bias"])
    with pytest.raises(ValueError, match="leave no floating-point tensor to merge, so the output would be a copy"):
        merge(experts, strategy=Linear(), include=["step"])
    with pytest.raises(ValueError, match="leave no floating-point tensor to merge"):
        merge(experts, strategy=Linear(), exclude=["*"])
    got = merge(experts, strategy=Linear(), include=["layers.0.w*"])
    assert torch.equal(got["layers.0.weight"], torch.full((2,), 0.5)) and torch.equal(got["layers.0.bias"],
                                                                                       torch.ones(2))


def _raw_safetensors(path: Path, header_text: str, data: bytes) -> Path:
    raw = header_text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_a_safetensors_header_naming_a_tensor_twice_is_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
    text = '{"w": ' + entry % (0, 4) + ', "w": ' + entry % (4, 8) + "}"
    data = torch.tensor([1.0, 2.0]).numpy().tobytes()
    with pytest.raises(ValueError, match="m.safetensors' is corrupted or crafted: its header names 'w' twice"):
        Expert(_raw_safetensors(tmp_path / "m.safetensors", text, data))
    twice = '{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(SafetensorsError, match="names 'dtype' twice"):
        from lightning_merge.files.safetensors import SafetensorsFile

        SafetensorsFile(_raw_safetensors(tmp_path / "d.safetensors", twice, data[:4]))


def test_a_shard_index_that_does_not_describe_its_shards_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_tensors(folder / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    save_tensors(folder / "model-00002-of-00002.safetensors", {"b": torch.ones(2)})
    index = folder / "model.safetensors.index.json"
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

    def write(text: str) -> None:
        index.write_text(text)

    write(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                                     "c": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="lists tensor 'c' in shard 'model-00002-of-00002.safetensors', but no shard "
                                         "holds it"):
        Expert(folder)
    write(json.dumps({"weight_map": {"a": two, "b": one}}))
    with pytest.raises(ValueError, match="lists tensor 'a' in shard 'model-00002-of-00002.safetensors', but it is in "
                                         "'model-00001-of-00002.safetensors'"):
        Expert(folder)
    write('{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors", '
          '"b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ValueError, match="index.json' names 'a' twice"):
        Expert(folder)
    write(json.dumps({"weight_map": {"a": one, "b": two}}))
    assert Expert(folder).names() == ["a", "b"]
    # .bin shards: a tensor in two shards was the last one read
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"a": torch.zeros(2)}, bins / "pytorch_model-00001-of-00002.bin")
    torch.save({"a": torch.ones(2), "b": torch.ones(2)}, bins / "pytorch_model-00002-of-00002.bin")
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(ValueError, match="tensor 'a' is in both"):
        Expert(bins)


def _adapter(root: Path, config: dict, rank: int = 2, lora_b=None) -> Expert:
    (root / "base").mkdir(exist_ok=True)
    save_tensors(root / "base" / "model.safetensors", {"layer.weight": torch.zeros(4, 6),
                                                       "head.weight": torch.zeros(3, 4)})
    folder = root / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_tensors(folder / "adapter_model.safetensors", {
        "base_model.model.layer.lora_A.weight": torch.ones(rank, 6),
        "base_model.model.layer.lora_B.weight": torch.ones(4, rank) if lora_b is None else lora_b,
        "base_model.model.head.lora_A.weight": torch.ones(4, 4),
        "base_model.model.head.lora_B.weight": torch.ones(3, 4)})
    return Expert(folder, base=root / "base")


def test_lora_factors_of_another_rank_than_the_config_says_are_refused(tmp_path):
    # the case: r=8, lora_alpha=16 over rank-2 factors read with scaling 16/2 = 8; PEFT's would be 16/8
    with pytest.raises(AdapterError, match="module 'layer' stores factors of rank 2 but adapter_config.json gives it "
                                           "r = 8 .*PEFT would not load it"):
        _adapter(tmp_path, {"r": 8, "lora_alpha": 16, "rank_pattern": {"head": 4}})
    with pytest.raises(AdapterError, match="module 'head' stores factors of rank 4 but adapter_config.json gives it "
                                           "r = 2"):
        _adapter(tmp_path, {"r": 2, "lora_alpha": 16, "rank_pattern": {"head": 2}})
    # rank_pattern and alpha_pattern as PEFT resolves them: layer r=2 α=16 (s = 8), head r=4 α=2 (s = 0.5); rsLoRA
    expert = _adapter(tmp_path, {"r": 2, "lora_alpha": 16, "rank_pattern": {"head": 4}, "alpha_pattern": {"head": 2}})
    scaling = {t: info["scaling"] for t, info in expert.lora.modules.items()}
    assert scaling == {"layer.weight": 8.0, "head.weight": 0.5}
    torch.testing.assert_close(expert.tensor("head.weight"), torch.full((3, 4), 4 * 0.5))
    expert = _adapter(tmp_path, {"r": 2, "lora_alpha": 16, "rank_pattern": {"head": 4}, "use_rslora": True})
    assert expert.lora.modules["head.weight"]["scaling"] == 8.0
    # a config without lora_alpha takes PEFT's default (8), not the rank
    import peft

    expert = _adapter(tmp_path, {"r": 2, "rank_pattern": {"head": 4}})
    assert expert.lora.modules["layer.weight"]["scaling"] == peft.LoraConfig().lora_alpha / 2


def test_lora_factors_that_are_not_finite_are_refused_on_every_path(tmp_path):
    bad = torch.ones(4, 2)
    bad[0, 0] = float("nan")
    expert = _adapter(tmp_path, {"r": 2, "lora_alpha": 2, "rank_pattern": {"head": 4}}, lora_b=bad)
    with pytest.raises(AdapterError, match="'base_model.model.layer.lora_B.weight' has 1 NaN or infinite values"):
        expert.float32("layer.weight")
    good = tmp_path / "good"
    good.mkdir()
    other = _adapter(good, {"r": 2, "lora_alpha": 2, "rank_pattern": {"head": 4}})
    # the exact adapter output concatenates factors without merging a tensor: it wrote the NaN
    with pytest.raises(AdapterError, match="lora_B.weight' has 1 NaN"):
        merge([other, expert], tmp_path / "base", TaskArithmetic(scale=0.5), out=tmp_path / "out", output="peft")
    assert not (tmp_path / "out").exists()


def test_rank_and_alpha_patterns_resolve_as_peft_resolves_them():
    """An alternation key (``q_proj|v_proj``) applied to the whole expression matched any name starting with
    ``….q_proj``; PEFT groups the key, so it applies to the end of the name only."""
    from peft.utils.other import get_pattern_key

    from lightning_merge.formats.lora import _pattern

    patterns = {"q_proj|v_proj": 4, r"layers\.1\.k_proj": 6, "o_proj": 2}
    for module in ("model.layers.0.q_proj", "model.layers.0.q_proj_extra", "model.v_proj", "model.layers.1.k_proj",
                   "model.layers.11.k_proj", "model.o_proj", "model.layers.0.o_proj.base", "x_o_proj", "q_proj"):
        key = get_pattern_key(list(patterns), module)
        assert _pattern(patterns, module, 8) == patterns.get(key, 8), module
