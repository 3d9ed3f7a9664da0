"""Every callback on a LoRA fine-tune, the way docs/lora.md shows it (issue 30): a tiny Llama with PEFT LoRA inside a
LightningModule that defines no ``forward``, token tasks with a token-mean loss and -100 padding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from capture_helpers import CountSteps  # noqa: E402
from lora_runs import LoraLM, lora_run, lora_trainer, save_base, task_loader  # noqa: E402

from lightning_merge.callbacks import CurvatureCapture  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and two finished LoRA runs on other tasks (adapter folders with statistics, last.ckpt + sidecar)."""
    root = tmp_path_factory.mktemp("lora-world")
    base = save_base(root / "base")
    runs = [lora_run(root / f"run{t}", base, t, seed=t) for t in (1, 2)]
    return base, runs


# -- item 2: the post-fit passes call what a causal-LM wrapper exposes ------------------------------------------------


def test_post_fit_fisher_calls_the_wrapped_peft_model_of_a_module_without_forward(world, tmp_path):
    from lightning_merge.capture.fisher import compute_fisher

    base, _ = world
    loader = task_loader(0, 4, 1, seed=7)
    capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=loader, fisher_examples=4,
                               save_final=False)
    module = LoraLM(base)
    lora_trainer(tmp_path, [capture], max_steps=3).fit(module, task_loader(0))
    stats = capture.finalize()
    # the reference: the per-example Fisher of the PEFT model itself (which has a forward), at the trained weights
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    sums, count = compute_fisher(module.model, task_loader(0, 4, 1, seed=7), estimator="example", num_examples=4,
                                 names=names)
    assert count == 4 and len(stats.names("fisher", "example")) == len(names) == 8  # 2 layers x q, v x A, B
    for name in names:
        torch.testing.assert_close(stats.get(f"model.{name}", "fisher", "example"), sums[name] / count,
                                   rtol=1e-4, atol=1e-10)


class TwoModels(LoraLM):
    def __init__(self, base):
        super().__init__(base)
        self.teacher = transformers.LlamaForCausalLM.from_pretrained(str(base))


class NoModel(LoraLM):
    def __init__(self, base):
        super().__init__(base)
        self.inner = torch.nn.ModuleDict({"lm": self.model})
        del self.model


@pytest.mark.parametrize("cls, held", [(TwoModels, "holds 2 Hugging Face / PEFT models (model, teacher)"),
                                       (NoModel, "wraps no Hugging Face / PEFT model")])
@pytest.mark.parametrize("setting", [{"fisher_after_fit": "example"}, {"gram": "after_fit"}])
def test_a_module_the_post_fit_pass_cannot_call_is_refused_before_training(world, tmp_path, cls, held, setting):
    base, _ = world
    steps = CountSteps()
    capture = CurvatureCapture(fisher_loader="train", **setting)
    with pytest.raises(ValueError, match="defines neither `forward` nor `fisher_logits`") as err:
        lora_trainer(tmp_path, [capture, steps], max_steps=2).fit(cls(base), task_loader(0))
    assert held in str(err.value) and "fisher_logits(self, batch)" in str(err.value)
    assert steps.batches == 0


def test_post_fit_gram_calls_the_wrapped_model(world, tmp_path):
    base, _ = world
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader="train",
                               fisher_examples=4, save_final=False)
    lora_trainer(tmp_path, [capture], max_steps=2).fit(LoraLM(base), task_loader(0))
    stats = capture.finalize()
    names = stats.names("gram")
    assert len(names) == 8 and all(".lora_" in n for n in names)  # the trained linears: lora_A and lora_B
    for name in names:
        assert stats.get(name, "gram").abs().sum() > 0


# -- item 1: MergeOnFitEnd on a PEFT module merges in ΔW space ---------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_model(base, folder):
    return peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(str(base)), str(folder)).eval()


def _same_adapter(a, b, base):
    from lightning_merge import Expert

    ea, eb = Expert(a, base=base), Expert(b, base=base)
    assert ea.names() == eb.names()
    for name in ea.names():
        torch.testing.assert_close(ea.tensor(name).float(), eb.tensor(name).float(), rtol=1e-5, atol=1e-6)


def test_merge_on_fit_end_of_a_lora_module_equals_the_command_line_and_is_what_test_sees(world, tmp_path):
    """Task arithmetic of the trained adapter and two adapter folders: the callback's adapter is the command line's
    for the same experts (the trained run's final.adapter), and trainer.test evaluates it."""
    import yaml

    from lightning_merge import TaskArithmetic
    from lightning_merge.callbacks import MergeOnFitEnd
    from lightning_merge.cli.commands import main

    base, runs = world
    experts = [str(r / "final.adapter") for r in runs]
    strategy = TaskArithmetic(weights=[0.5, 0.3, 0.2])
    merger = MergeOnFitEnd(experts, strategy, out=str(tmp_path / "merged.adapter"))
    module = LoraLM(base)
    trainer = lora_trainer(tmp_path, [CurvatureCapture(), merger], max_steps=4)
    trainer.fit(module, task_loader(0))
    recipe = {"strategy": {"name": "task_arithmetic", "weights": [0.5, 0.3, 0.2]}, "base_model": str(base),
              "models": [{"model": str(tmp_path / "final.adapter")}, *({"model": e} for e in experts)]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "cli"), "--output", "peft"]) == 0
    _same_adapter(tmp_path / "merged.adapter", tmp_path / "cli", base)
    # the module now runs the merged adapter: its logits are the command line adapter's, and trainer.test sees them
    assert module.model.active_adapter == "merged"
    ids = next(iter(task_loader(0, 4, 4)))["input_ids"]
    reference = _adapter_model(base, tmp_path / "cli")
    torch.testing.assert_close(_logits(module.model.eval(), ids), _logits(reference, ids), rtol=1e-4, atol=1e-5)
    plain = transformers.LlamaForCausalLM.from_pretrained(str(base)).eval()
    assert (_logits(module.model, ids) - _logits(plain, ids)).abs().max() > 1e-3  # the merge moved the model
    trainer.test(module, task_loader(0, 4, 4))
    batch = next(iter(task_loader(0, 4, 4)))
    with torch.no_grad():
        expected = float(reference(**batch).loss)
    assert module.test_losses == [pytest.approx(expected, rel=1e-5)]


def test_fisher_merge_of_lora_checkpoints_at_fit_end_equals_merge_of_their_adapter_folders(world, tmp_path):
    """Experts given as the other runs' last.ckpt (their sidecars' statistics renamed like the adapter) and a Fisher
    merge at rank 8: the same adapter as merge() of the adapter folders beside those checkpoints."""
    from lightning_merge import Fisher, merge
    from lightning_merge.callbacks import MergeOnFitEnd

    base, runs = world
    capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=task_loader(0, 4, 1, seed=7),
                               fisher_examples=4)
    merger = MergeOnFitEnd([str(r / "last.ckpt") for r in runs], Fisher(), rank=8)
    module = LoraLM(base)
    lora_trainer(tmp_path, [capture, merger], max_steps=4).fit(module, task_loader(0))
    merge([tmp_path / "final.adapter", *(r / "last.adapter" for r in runs)], strategy=Fisher(), out=tmp_path / "ref",
          output="peft", rank=8)
    _same_adapter(tmp_path / "merged.adapter", tmp_path / "ref", base)
    ids = next(iter(task_loader(0, 4, 4)))["input_ids"]
    torch.testing.assert_close(_logits(module.model.eval(), ids), _logits(_adapter_model(base, tmp_path / "ref"), ids),
                               rtol=1e-4, atol=1e-5)


def test_what_cannot_be_merged_in_delta_w_space_is_refused_before_training(world, tmp_path):
    from lightning_merge import Fisher, TaskArithmetic
    from lightning_merge.callbacks import MergeOnFitEnd
    from lightning_merge.files.safetensors import save_tensors

    base, runs = world
    full = tmp_path / "full.safetensors"
    save_tensors(full, {"w": torch.zeros(2)})
    adapters = [str(r / "final.adapter") for r in runs]
    cases = [
        (MergeOnFitEnd([str(full)], TaskArithmetic()), "neither a LoRA adapter folder"),
        (MergeOnFitEnd(adapters, Fisher()), "pass rank="),
        (MergeOnFitEnd(adapters, TaskArithmetic(), out=str(tmp_path / "m.safetensors")), "give a folder"),
        (MergeOnFitEnd(adapters, Fisher(), rank=4), "needs the 'fisher' statistic of the model this fit trains"),
    ]
    for merger, message in cases:
        steps = CountSteps()
        with pytest.raises(ValueError, match=message):
            lora_trainer(tmp_path, [merger, steps], max_steps=2).fit(LoraLM(base), task_loader(0))
        assert steps.batches == 0


# -- item 3: CheckpointAveraging in a LoRA run writes the averaged adapter, in ΔW space --------------------------------


def _ckpt_delta(path, name):
    """ΔW = s·B A of module ``name`` (e.g. ``...layers.0.self_attn.q_proj``) held in a LoRA run's checkpoint."""
    state = torch.load(path, weights_only=True)["state_dict"]
    a = state[f"model.base_model.model.{name}.lora_A.default.weight"]
    b = state[f"model.base_model.model.{name}.lora_B.default.weight"]
    return 2.0 * b @ a, a, b  # lora_alpha / r = 8 / 4


def test_checkpoint_averaging_of_a_lora_run_averages_adapters_in_delta_w_space(world, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge import Expert
    from lightning_merge.callbacks import CheckpointAveraging

    base, _ = world
    folder = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=2, monitor="step", mode="max")
    averaging = CheckpointAveraging(select="all")
    module = LoraLM(base, lr=3e-2)
    lora_trainer(tmp_path, [CurvatureCapture(), ckpt, averaging], max_steps=6).fit(module, task_loader(0, 12))
    files = sorted(folder.glob("*step=*.ckpt"), key=lambda f: int(f.stem.split("step=")[1]))
    assert len(files) == 3 and not (folder / "averaged.ckpt").exists()
    averaged = Expert(folder / "averaged.adapter", base=base)
    plain = Expert(base)
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            deltas = [_ckpt_delta(f, name) for f in files]
            mean = sum(d for d, _, _ in deltas) / 3
            got = averaged.tensor(f"{name}.weight").float() - plain.tensor(f"{name}.weight").float()
            torch.testing.assert_close(got, mean, rtol=1e-4, atol=1e-7)
            factors = 2.0 * (sum(b for _, _, b in deltas) / 3) @ (sum(a for _, a, _ in deltas) / 3)
            assert float((factors - mean).norm()) > 1e-3 * float(mean.norm())  # the factor average is another model
    # the module runs the average; final.adapter keeps the last trained adapter (the one its statistics describe)
    assert module.model.active_adapter == "averaged"
    ids = next(iter(task_loader(0, 4, 4)))["input_ids"]
    torch.testing.assert_close(_logits(module.model.eval(), ids),
                               _logits(_adapter_model(base, folder / "averaged.adapter"), ids), rtol=1e-4, atol=1e-5)
    final = Expert(folder / "final.adapter", base=base)
    last, _, _ = _ckpt_delta(files[-1], "model.layers.0.self_attn.q_proj")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(final.tensor(name).float() - plain.tensor(name).float(), last, rtol=1e-4, atol=1e-7)


def test_checkpoint_averaging_of_a_lora_run_refuses_what_no_adapter_holds(world, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge.callbacks import CheckpointAveraging

    base, _ = world
    for averaging, message in [
        (CheckpointAveraging(select="all", weighting="fisher"), "pass rank="),
        (CheckpointAveraging(select="all", out=str(tmp_path / "a.ckpt")), "give a folder"),
    ]:
        steps = CountSteps()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2)
        with pytest.raises(ValueError, match=message):
            lora_trainer(tmp_path, [CurvatureCapture(), ckpt, averaging, steps], max_steps=2).fit(
                LoraLM(base), task_loader(0))
        assert steps.batches == 0


def test_stochastic_weight_averaging_and_loading_the_checkpoint_average_are_refused_together(tmp_path):
    from capture_helpers import Tiny, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging

    from lightning_merge.callbacks import CheckpointAveraging

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    steps = CountSteps()
    with pytest.raises(ValueError, match="StochasticWeightAveraging: both set the module's final weights"):
        trainer(tmp_path, [StochasticWeightAveraging(swa_lrs=1e-2), ckpt, CheckpointAveraging(select="all"), steps],
                max_epochs=2).fit(Tiny(lr=5e-2), loader())
    assert steps.batches == 0
    # load_averaged=False: the module keeps SWA's weights, the file holds the checkpoint average
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_top_k=-1, every_n_epochs=1)
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    model = Tiny(lr=5e-2)
    trainer(tmp_path, [swa, ckpt, CheckpointAveraging(select="all", load_averaged=False)], max_epochs=3).fit(
        model, loader())
    swa_weights = swa._average_model.state_dict()["net.0.weight"]
    torch.testing.assert_close(model.state_dict()["net.0.weight"], swa_weights)
    assert (tmp_path / "ckpt2" / "averaged.ckpt").exists()


def test_ema_weight_averaging_then_the_checkpoint_average_is_what_the_module_ends_with(tmp_path):
    from capture_helpers import Tiny, loader, trainer
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from lightning_merge.callbacks import CheckpointAveraging

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = Tiny(lr=5e-2)
    trainer(tmp_path, [EMAWeightAveraging(decay=0.9), ckpt, CheckpointAveraging(select="all")], max_epochs=2).fit(
        model, loader())
    files = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))
    ema = [torch.load(f, weights_only=True)["state_dict"]["net.0.weight"] for f in files]
    torch.testing.assert_close(model.state_dict()["net.0.weight"], sum(ema) / len(ema))  # loaded after EMA's copy


def test_merge_on_fit_end_merges_the_averaged_adapter_of_a_lora_run(world, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge import TaskArithmetic, merge
    from lightning_merge.callbacks import CheckpointAveraging, MergeOnFitEnd

    base, runs = world
    experts = [str(r / "final.adapter") for r in runs]
    folder = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=2, monitor="step", mode="max")
    merger = MergeOnFitEnd(experts, TaskArithmetic(), out=str(tmp_path / "merged.adapter"))
    module = LoraLM(base)
    lora_trainer(tmp_path, [merger, CurvatureCapture(), ckpt, CheckpointAveraging(select="all")], max_steps=4).fit(
        module, task_loader(0))
    merge([folder / "averaged.adapter", *experts], strategy=TaskArithmetic(), out=tmp_path / "ref", output="peft")
    _same_adapter(tmp_path / "merged.adapter", tmp_path / "ref", base)
    assert module.model.active_adapter == "merged"


# -- item 6 (part): a re-run and an existing final.adapter -------------------------------------------------------------


def test_a_final_adapter_lightning_merge_did_not_write_is_refused_before_training(world, tmp_path):
    from lightning_merge.errors import ForeignOutput

    base, _ = world
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(str(base)),
                                 peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "final.adapter")  # a user's adapter where the run writes its own
    before = sorted(p.name for p in (tmp_path / "final.adapter").iterdir())
    steps = CountSteps()
    with pytest.raises(ForeignOutput, match="final.adapter' is a folder lightning-merge did not write"):
        lora_trainer(tmp_path, [CurvatureCapture(), steps], max_steps=2).fit(LoraLM(base), task_loader(0))
    assert steps.batches == 0
    assert sorted(p.name for p in (tmp_path / "final.adapter").iterdir()) == before


def test_a_re_run_replaces_its_own_earlier_final_adapter(world, tmp_path):
    import json

    from lightning_merge.formats.sidecar import Statistics

    base, _ = world
    lora_trainer(tmp_path, [CurvatureCapture()], max_steps=2).fit(LoraLM(base, seed=1), task_loader(0))
    first = json.loads((tmp_path / "final.adapter" / "lightning_merge.json").read_text())
    module = LoraLM(base, seed=2)
    lora_trainer(tmp_path, [CurvatureCapture()], max_steps=3).fit(module, task_loader(0))
    second = json.loads((tmp_path / "final.adapter" / "lightning_merge.json").read_text())
    assert first["checkpoint_metadata"] != second["checkpoint_metadata"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "final.adapter" / "adapter_model.safetensors")
    live = peft.get_peft_model_state_dict(module.model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)  # the second run's
    assert Statistics.load(tmp_path / "final.adapter" / "statistics.safetensors").kinds["exp_avg_sq"]["step"] == 3
    # a file the user added to the folder makes it no longer ours alone: the next run refuses it before training
    (tmp_path / "final.adapter" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="did not write|notes.txt"):
        lora_trainer(tmp_path, [CurvatureCapture()], max_steps=2).fit(LoraLM(base), task_loader(0))
    assert (tmp_path / "final.adapter" / "notes.txt").read_text() == "mine"
