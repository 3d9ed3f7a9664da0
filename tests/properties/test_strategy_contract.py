"""The strategy contract (docs/design.md): strategies are immutable and declare their algebra, and each defect the
"one strategy, one model on every path" issue measured has a test here that failed before the contract."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
import torch

from lightning_merge import (
    OTA,
    ContinualState,
    Expert,
    Fisher,
    Linear,
    RegMean,
    TaskArithmetic,
    Ties,
    merge,
    prepare,
)
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import write_statistics
from lightning_merge.strategies import LinearForm, Prepared, Strategy


def family(root, n=3, seed=0, stats=True):
    g = torch.Generator().manual_seed(seed)
    base = {"layers.0.weight": torch.randn(6, 5, generator=g), "layers.0.bias": torch.randn(6, generator=g),
            "head.weight": torch.randn(3, 6, generator=g)}
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(n):
        expert = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        path = root / f"e{i}.safetensors"
        save_tensors(path, expert)
        if stats:
            write_statistics(
                root / f"e{i}.statistics.safetensors",
                {"fisher.example": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()},
                 "exp_avg_sq": {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()}},
                {"fisher.example": {"count": 8}, "exp_avg_sq": {"beta2": 0.999, "step": 10}},
            )
        paths.append(path)
    return root / "base.safetensors", paths


def close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=tol, atol=tol)


def continual(root, base, paths, strategy, name="state"):
    state = ContinualState.create(root / name, base=base, strategy=strategy)
    for p in paths:
        state.add(p)
    return state.state_dict()


# -- immutability --------------------------------------------------------------------------------------------------


def test_strategies_are_immutable_and_prepare_returns_the_global_quantities(tmp_path):
    base, paths = family(tmp_path)
    strategy = Fisher(normalize=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.scale = 2.0
    prepared = prepare(paths, base, strategy)
    assert isinstance(prepared, Prepared) and prepared.strategy is strategy
    assert len(prepared["norms"]) == 3 and all(n > 0 for n in prepared["norms"])
    assert strategy == Fisher(normalize=True)  # nothing was written into the configuration


def test_one_strategy_serves_two_merges_at_once(tmp_path):
    base, paths = family(tmp_path)
    (tmp_path / "other").mkdir()
    other_base, other = family(tmp_path / "other", seed=1)
    strategy = Ties(density=0.5, topk="model")  # a global pass whose thresholds differ between the two merges
    alone = [merge(paths, base, strategy), merge(other, other_base, strategy)]
    results: dict[int, dict] = {}
    barrier = threading.Barrier(2)

    def run(i, experts, b):
        barrier.wait()
        results[i] = merge(experts, b, strategy, threads=1)

    threads = [threading.Thread(target=run, args=(0, paths, base)),
               threading.Thread(target=run, args=(1, other, other_base))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close(results[0], alone[0], 0)
    close(results[1], alone[1], 0)


# -- the measured defects ----------------------------------------------------------------------------------------


def test_continual_task_arithmetic_with_normalize_and_scale_equals_the_batch_merge(tmp_path):
    base, paths = family(tmp_path)
    strategy = TaskArithmetic(normalize=True, scale=0.7)
    close(continual(tmp_path, base, paths, strategy), merge(paths, base, strategy))


def test_continual_linear_without_normalisation_equals_the_batch_merge(tmp_path):
    base, paths = family(tmp_path)
    strategy = Linear(normalize=False, weights=0.4)
    close(continual(tmp_path, base, paths, strategy), merge(paths, base, strategy))
    assert Linear(normalize=False, weights=[0.5, 0.3, 0.4]).linear_form(3) == LinearForm(0.0, (0.5, 0.3, 0.4))


def test_adapter_output_refuses_what_an_adapter_cannot_hold_before_writing(tmp_path):
    base, paths = family(tmp_path)
    with pytest.raises(ValueError, match="not linear in the experts"):
        merge(paths, base, TaskArithmetic(election="weighted"), out=tmp_path / "a", output="peft")
    with pytest.raises(ValueError, match="scales the base itself"):
        merge(paths, base, Linear(weights=[0.5, 0.3, 0.4], normalize=False), out=tmp_path / "a", output="peft",
              rank=4)
    assert not (tmp_path / "a").exists()


def test_missing_statistic_policy_does_not_take_shapes_from_the_first_expert(tmp_path):
    base, paths = family(tmp_path, stats=False)
    lacking = {k: Expert(paths[0]).tensor(k) for k in ("layers.0.weight", "layers.0.bias")}  # no head.weight
    save_tensors(tmp_path / "lacking.safetensors", lacking)
    experts = [tmp_path / "lacking.safetensors", paths[1], paths[2]]
    out = merge(experts, base, Fisher(normalize=False), on_missing="base", on_missing_statistic="uniform")
    # with uniform weights everywhere Fisher is the plain average, the lacking expert counting as the base
    b = Expert(base)
    expected = (b.tensor("head.weight") + Expert(paths[1]).tensor("head.weight") + Expert(paths[2]).tensor(
        "head.weight")) / 3
    torch.testing.assert_close(out["head.weight"], expected)


def test_checkpoint_output_whose_template_needs_trust_fails_before_the_merge(tmp_path, monkeypatch):
    import argparse

    base, paths = family(tmp_path)
    template = tmp_path / "template.ckpt"
    torch.save({"state_dict": {k: Expert(base).tensor(k) for k in Expert(base).names()},
                "hyper_parameters": {"args": argparse.Namespace(lr=1)}}, template)
    import lightning_merge.engine.run as engine

    merged = []
    real = engine.compute
    monkeypatch.setattr(engine, "compute", lambda *a, **k: merged.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        merge([template, template], strategy=Linear(), out=tmp_path / "m.ckpt")
    assert not merged and not (tmp_path / "m.ckpt").exists()
    trusted = Expert(template, trust_checkpoint=True)
    out = merge([trusted, trusted], strategy=Linear(), out=tmp_path / "m.ckpt")
    loaded = torch.load(out, weights_only=False)
    assert isinstance(loaded["hyper_parameters"]["args"], argparse.Namespace)


def test_adapter_and_tall_folders_are_fsynced_under_unique_temporary_names(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import lightning_merge.engine.writers as writers
    import lightning_merge.tools.tall as tall

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    for name in ("a", "b"):
        model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
    synced: list[str] = []
    for module in (writers, tall):
        real = module.fsync_tree
        monkeypatch.setattr(module, "fsync_tree", lambda p, real=real: synced.append(p.name) or real(p))
    partials = {writers.partial_path(tmp_path / "out") for _ in range(50)}
    assert len(partials) == 50 and all(f"-{os.getpid()}-" in p.name for p in partials)
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "base", TaskArithmetic(), out=tmp_path / "out", output="peft")
    assert synced and synced[-1].startswith(".out.partial-")
    tall.compress([tmp_path / "a", tmp_path / "b"], tmp_path / "base", tmp_path / "tall")
    assert synced[-1].startswith(".tall.partial-")
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_precision_strategies_take_their_base_form_on_every_path(tmp_path):
    base, paths = family(tmp_path)
    for i, strategy in enumerate((Fisher(), OTA(density=0.5), Fisher(normalize=False, scale=1.3))):
        close(continual(tmp_path, base, paths, strategy, name=f"state{i}"), merge(paths, base, strategy))


# -- one check of the base, one way to call merge_tensor (issue 28) --------------------------------------------------


def _tensors(n=2, shape=(3, 4)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class _Shift(Strategy):
    """A custom strategy that writes no base check of its own (θ₀ + Σ τᵢ)."""

    def merge_tensor(self, name, base, tensors, stats, prepared=None):
        return base + sum(t - base for t in tensors)


def test_the_base_check_is_made_once_from_the_declaration():
    """Prepared.merge_tensor refuses a missing base for every strategy whose needs_base says so, with one message
    naming the strategy and the tensor, a custom strategy included; those that need none merge without one."""
    from lightning_merge.strategies import STRATEGIES

    tensors = _tensors()
    stats = [{"fisher": t.abs() + 0.1, "exp_avg_sq": t.abs() + 0.1, "exp_avg_sq.raw": t.abs() + 0.1} for t in tensors]
    library = [cls() for name, cls in sorted(STRATEGIES.items()) if cls.__module__.startswith("lightning_merge.")]
    optional = [Fisher(normalize=False), OTA(), RegMean()]
    needing = [Fisher(scale=2.0), OTA(density=0.5), OTA(scale=0.5), RegMean(scale=2.0), _Shift()]
    for strategy in library + optional + needing:
        prepared = Prepared(strategy, len(tensors))
        if strategy.needs_base:
            with pytest.raises(ValueError, match=rf"^{type(strategy).__name__} needs a base model \(base=...\): "
                                                 r"tensor 'layers.0.weight' has none"):
                prepared.merge_tensor("layers.0.weight", None, tensors, stats)
        else:
            assert prepared.merge_tensor("layers.0.weight", None, tensors, stats).shape == tensors[0].shape
    assert {type(s).__name__ for s in library if not s.needs_base} == {"Fisher", "Karcher", "Linear", "MultiSlerp",
                                                                       "NuSlerp", "OTA", "RegMean"}
    assert all(s.needs_base for s in needing) and not any(s.needs_base for s in optional)


def test_a_tensor_the_base_lacks_is_named_when_the_strategy_needs_a_base(tmp_path):
    base = {"w": torch.ones(3)}
    experts = [{"w": torch.full((3,), 2.0), "head": torch.ones(2)}, {"w": torch.full((3,), 3.0), "head": torch.ones(2)}]
    with pytest.raises(ValueError, match=r"TaskArithmetic needs a base model .*'head' has none.*on_missing='base'"):
        merge(experts, base, TaskArithmetic(), on_missing="union")
    assert sorted(merge(experts, base, TaskArithmetic(), on_missing="base")) == ["w"]


def test_merge_tensor_gets_the_prepared_merge_by_its_parameter_name():
    """Prepared passes itself to a merge_tensor that has a ``prepared`` parameter (or *args), and calls the older
    four-argument form otherwise, whatever other parameters it has (**options used to be taken for a fifth)."""
    tensors = _tensors()

    @dataclasses.dataclass(frozen=True)
    class Options(Strategy):
        needs_base = False

        def merge_tensor(self, name, base, tensors, stats, **options):
            assert not options
            return tensors[0] * 2

    @dataclasses.dataclass(frozen=True)
    class Named(Strategy):
        needs_base = False

        def merge_tensor(self, name, base, tensors, stats, prepared):
            return tensors[0] * prepared["factor"]

    @dataclasses.dataclass(frozen=True)
    class Starred(Strategy):
        needs_base = False

        def merge_tensor(self, name, base, tensors, stats, *rest):
            return tensors[0] * rest[0]["factor"]

    assert torch.equal(Prepared(Options(), 2).merge_tensor("w", None, tensors, [{}, {}]), tensors[0] * 2)
    for cls in (Named, Starred):
        assert torch.equal(Prepared(cls(), 2, factor=3.0).merge_tensor("w", None, tensors, [{}, {}]), tensors[0] * 3)


def test_declarations_are_properties_a_class_attribute_or_a_property_overrides():
    """requires / needs_base / uses_base / scalable / global_pass read the same on every strategy object, whether a
    class declares a constant (Linear's needs_base) or computes it from its arguments (Fisher's requires)."""
    from lightning_merge.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        if not cls.__module__.startswith("lightning_merge."):
            continue
        s = cls()
        assert isinstance(s.requires, tuple) and all(isinstance(k, str) for k in s.requires), name
        for flag in ("needs_base", "uses_base", "scalable", "global_pass"):
            assert isinstance(getattr(s, flag), bool), (name, flag)
    assert Fisher(estimator="example").requires == ("fisher.example",) and OTA().requires == ("exp_avg_sq.raw",)
    assert OTA(bias_correct=True).requires == ("exp_avg_sq",)  # OTA reads the raw exp_avg_sq unless told to correct
    assert not Linear().needs_base and not Linear().uses_base and _Shift().needs_base and _Shift().uses_base
    assert Ties(weighting="fisher").global_pass and not Ties().global_pass and Ties().scalable


def test_an_argument_error_names_the_class_that_was_built():
    @dataclasses.dataclass(frozen=True)
    class MyTies(Ties):
        pass

    @dataclasses.dataclass(frozen=True)
    class MyFisher(Fisher):
        pass

    with pytest.raises(ValueError, match=r"^MyTies\.density must be in \[0.0, 1.0\]"):
        MyTies(density=2.0)
    with pytest.raises(ValueError, match=r"^MyFisher\.floor must be in \[0, inf\]"):
        MyFisher(floor=-1.0)
    with pytest.raises(ValueError, match=r"^Ties\.density must be in"):
        Ties(density=2.0)
