"""MergeOnFitEnd: the merge equals merge() run by hand on the same inputs, the module ends with it, the captured
statistics of the run are used, heads outside `include` stay, .ckpt output loads, DDP ranks agree."""

from __future__ import annotations

import pytest
import torch
from capture_helpers import SaveRankWeights, Tiny, ddp_loader, loader, trainer

from lightning_merge import OTA, Expert, Fisher, TaskArithmetic, merge
from lightning_merge.callbacks import CurvatureCapture, MergeOnFitEnd


def make_experts(tmp_path, seeds=(1, 2), epochs=(1, 1)):
    paths = []
    for s, e in zip(seeds, epochs):
        root = tmp_path / f"expert{s}"
        trainer(root, [CurvatureCapture()], max_epochs=e).fit(Tiny(lr=5e-2), loader(32, 8, seed=s))
        paths.append(str(root / "final.safetensors"))
    return paths


def test_merge_at_fit_end_equals_merge_by_hand_and_is_loaded(tmp_path):
    paths = make_experts(tmp_path)
    capture = CurvatureCapture()
    merger = MergeOnFitEnd(experts=paths, strategy=Fisher(scale=1.5), dirpath=str(tmp_path / "run"))
    model = Tiny(lr=5e-2)
    trainer(tmp_path / "run", [merger, capture], max_epochs=1).fit(model, loader(32, 8, seed=3))
    # the callback order put MergeOnFitEnd first: it still used the capture's statistics (finalize)
    merged_file = tmp_path / "run" / "merged.safetensors"
    assert merger.merged_path == str(merged_file)
    snapshot = Expert(tmp_path / "run" / "merge_base_snapshot.safetensors")
    torch.testing.assert_close(snapshot.tensor("net.0.weight"), Tiny(lr=5e-2).net[0].weight.detach())
    by_hand = merge([Expert(tmp_path / "run" / "final.safetensors"), *paths], base=snapshot, strategy=Fisher(scale=1.5))
    on_disk = Expert(merged_file)
    for name, value in by_hand.items():
        torch.testing.assert_close(on_disk.tensor(name), value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_ota_with_raw_second_moments_at_fit_end_is_the_reference_weighting_of_unequal_runs(tmp_path):
    """Experts and the run trained for 4, 12 and 8 steps: the callback (whose setup checks the run captures second
    moments for the raw form too) merges with the raw exp_avg_sq, Σ(vᵢ^0.5 + ε)τᵢ / Σ(vᵢ^0.5 + ε), as merge() does."""
    paths = make_experts(tmp_path, epochs=(1, 3))
    strategy = OTA(bias_correct=False, scale=1.5)
    merger = MergeOnFitEnd(experts=paths, strategy=strategy, dirpath=str(tmp_path / "run"))
    trainer(tmp_path / "run", [merger, CurvatureCapture()], max_epochs=2).fit(Tiny(lr=5e-2), loader(32, 8, seed=3))
    snapshot = Expert(tmp_path / "run" / "merge_base_snapshot.safetensors")
    experts = [Expert(tmp_path / "run" / "final.safetensors"), *(Expert(p) for p in paths)]
    assert [e.metadata["exp_avg_sq"]["step"] for e in experts] == [8, 4, 12]  # one step for every parameter
    on_disk = Expert(tmp_path / "run" / "merged.safetensors")
    by_hand = merge(experts, base=snapshot, strategy=strategy)
    corrected = merge(experts, base=snapshot, strategy=OTA(scale=1.5, bias_correct=True))
    for name, value in by_hand.items():
        torch.testing.assert_close(on_disk.tensor(name), value, rtol=1e-6, atol=1e-7)
        w = [e.statistics.raw(name, "exp_avg_sq").sqrt() + 1e-8 for e in experts]
        tau = [e.tensor(name) - snapshot.tensor(name) for e in experts]
        expected = snapshot.tensor(name) + 1.5 * sum(a * t for a, t in zip(w, tau)) / sum(w)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(corrected[n], by_hand[n], rtol=1e-3, atol=1e-5) for n in by_hand)


def test_include_keeps_the_module_head_and_ckpt_output_loads(tmp_path):
    paths = make_experts(tmp_path)
    out = tmp_path / "merged.ckpt"
    merger = MergeOnFitEnd(
        experts=paths, strategy=TaskArithmetic(scale=0.5), base=paths[0], include=["net.0.*"], out=str(out)
    )
    model = Tiny(lr=5e-2)
    tr = trainer(tmp_path / "run", [merger], max_epochs=1)
    tr.fit(model, loader(32, 8, seed=3))
    trained_head = None
    # the head (net.2) was not merged: the module keeps its trained values; net.0 is the task-arithmetic merge
    reloaded = Tiny.load_from_checkpoint(out)
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    base = Expert(paths[0])
    loaded = torch.load(out, weights_only=True)
    assert loaded["lightning_merge"]["strategy"]["name"] == "task_arithmetic"
    trained_head = loaded["state_dict"]["net.2.weight"]
    assert not torch.equal(trained_head, base.tensor("net.2.weight"))
    # trainer.validate sees the merged model
    metrics = tr.validate(model, loader(16, 8, seed=1), verbose=False)
    assert "val_loss" in metrics[0]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="expert 'nope.ckpt' does not exist"):
        MergeOnFitEnd(experts=["nope.ckpt"], strategy=TaskArithmetic())
    with pytest.raises(ValueError, match="list of paths"):
        MergeOnFitEnd(experts="one.ckpt", strategy=TaskArithmetic())
    with pytest.raises(ValueError, match="unknown strategy"):
        MergeOnFitEnd(experts=[], strategy={"name": "nope"})
    with pytest.raises(ValueError, match=".safetensors or .ckpt"):
        MergeOnFitEnd(experts=[], strategy=TaskArithmetic(), out="x.bin")


@pytest.mark.slow
def test_ddp_every_rank_ends_with_the_merged_weights(tmp_path):
    paths = make_experts(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    merger = MergeOnFitEnd(experts=paths, strategy=Fisher(), dirpath=str(run))
    trainer(
        run,
        [CurvatureCapture(), merger, SaveRankWeights(str(run))],
        max_epochs=1,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    ).fit(Tiny(lr=5e-2), ddp_loader(32, 4, seed=3))
    merged = Expert(run / "merged.safetensors")
    r0, r1 = torch.load(run / "rank0.pt", weights_only=True), torch.load(run / "rank1.pt", weights_only=True)
    for name in merged.names():
        assert torch.equal(r0[name], merged.tensor(name)) and torch.equal(r1[name], merged.tensor(name))


@pytest.mark.parametrize("first", ["merge", "ema"])
def test_the_ema_average_is_what_is_merged_and_folded_whatever_the_order(tmp_path, first):
    """Lightning's weight averaging copies its average into the module in on_train_end: MergeOnFitEnd and
    ContinualMerge move themselves after it, so they merge the average whichever way the callbacks are listed."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from lightning_merge import ContinualState, Linear
    from lightning_merge.callbacks import ContinualMerge
    from lightning_merge.files.safetensors import save_tensors

    (other,) = make_experts(tmp_path, seeds=(1,))
    save_tensors(tmp_path / "base.safetensors", Tiny(lr=5e-2).state_dict())
    merger = MergeOnFitEnd(experts=[other], strategy=Linear(), dirpath=str(tmp_path / "run"), load_merged=False)
    fold = ContinualMerge(state=str(tmp_path / "state"), base=str(tmp_path / "base.safetensors"),
                          strategy=TaskArithmetic(), name="run")
    ema = EMAWeightAveraging(decay=0.5)
    callbacks = [merger, fold, ema] if first == "merge" else [ema, merger, fold]
    model = Tiny(lr=5e-2)
    fit = trainer(tmp_path / "run", callbacks, max_epochs=2)
    fit.fit(model, loader(32, 8, seed=3))
    averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}  # EMA's average, in the module now
    order = fit.callbacks.index
    assert order(merger) > order(ema) and order(fold) > order(ema)
    merged = Expert(tmp_path / "run" / "merged.safetensors")
    for name, value in averaged.items():
        expect = (value + Expert(other).tensor(name)) / 2
        torch.testing.assert_close(merged.tensor(name), expect, rtol=1e-6, atol=1e-7)
    folded = ContinualState(tmp_path / "state").state_dict()
    base = Expert(tmp_path / "base.safetensors")
    for name, value in averaged.items():  # one expert folded with task arithmetic (scale 1): the average itself
        torch.testing.assert_close(folded[name], base.tensor(name) + (value - base.tensor(name)), rtol=1e-6,
                                   atol=1e-6)
