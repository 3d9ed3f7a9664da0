"""Native to Lightning, PEFT and mergekit users: the frictions found by trying every documented workflow, each with
a test that failed before: wrong results without a word, late failures, LightningCLI, the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from capture_helpers import CountSteps, Tiny, TinyData, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_merge import ContinualState, Expert, Fisher, Linear, Ties, merge
from lightning_merge.callbacks import CheckpointAveraging, ContinualMerge, MergeOnFitEnd
from lightning_merge.cli.commands import main
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.tools.averaging import read_info


def _expert(tmp_path, seed=1, name="other.safetensors"):
    state = Tiny(seed=seed).state_dict()
    save_tensors(tmp_path / name, state)
    return tmp_path / name


# -- wrong results without a word ----------------------------------------------------------------------------------


def test_average_skips_copies_of_a_checkpoint_and_its_own_outputs(tmp_path, capsys):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=3, save_last=True)
    trainer(tmp_path, [ckpt], max_epochs=4).fit(Tiny(lr=5e-2), loader(), loader(16, 8, seed=1))
    folder = tmp_path / "ckpt"
    assert (folder / "last.ckpt").exists()
    files = sorted(str(p) for p in folder.glob("*.ckpt"))
    assert main(["average", *files, "--out", str(folder / "averaged.ckpt")]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "last.ckpt" in err and "a copy of" in err
    files = sorted(str(p) for p in folder.glob("*.ckpt"))  # now with averaged.ckpt among them
    assert main(["average", *files, "--out", str(tmp_path / "again.ckpt")]) == 0
    err = capsys.readouterr().err
    assert "averaged.ckpt: an output of lightning-merge" in err
    distinct = [p for p in sorted(folder.glob("epoch=*.ckpt"))]
    assert len(distinct) == 3
    want = merge([Expert(p) for p in distinct], strategy=Linear())
    got = Expert(tmp_path / "again.ckpt")
    for name, value in want.items():
        torch.testing.assert_close(got.tensor(name), value)
    assert json.loads(json.dumps(torch.load(tmp_path / "again.ckpt", weights_only=True)["lightning_merge"]))[
        "averaged"] == [str(p) for p in distinct]


@pytest.mark.parametrize("averaging_first", [True, False])
def test_averaging_then_merging_merges_the_average_whatever_the_order(tmp_path, averaging_first):
    other = _expert(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2)
    averaging = CheckpointAveraging(select="top_k", k=2)
    merger = MergeOnFitEnd(experts=[str(other)], strategy=Linear(), out=str(tmp_path / "merged.safetensors"))
    callbacks = [ckpt, averaging, merger] if averaging_first else [ckpt, merger, averaging]
    module = Tiny(lr=5e-2)
    trainer(tmp_path, callbacks, max_epochs=3).fit(module, loader(), loader(16, 8, seed=1))
    average = Expert(tmp_path / "ckpt" / "averaged.ckpt")
    want = merge([average, Expert(other)], strategy=Linear())
    merged = Expert(tmp_path / "merged.safetensors")
    for name, value in want.items():
        torch.testing.assert_close(merged.tensor(name), value)
        torch.testing.assert_close(module.state_dict()[name], value)  # the module ends with the merge


def test_bf16_output_says_so_in_config_json(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", {"w": torch.randn(4, 4)})
    (folder / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "float32"}))
    out = merge([folder, folder], strategy=Linear(), out=tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Expert(out).spec("w").dtype == torch.bfloat16


# -- fail early, the Lightning way ------------------------------------------------------------------------------


def test_merge_callbacks_fail_in_setup_before_any_training_step(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_tensors(wrong, {k: torch.zeros(2, 2) if v.dim() == 2 else v for k, v in Tiny().state_dict().items()})
    cases = [
        (lambda: [MergeOnFitEnd(experts=[str(wrong)], strategy=Linear())], "has shape \\[2, 2\\]"),
        (lambda: [MergeOnFitEnd(experts=[str(_expert(tmp_path))], strategy=Fisher())], "has no 'fisher' statistics"),
        (lambda: [CheckpointAveraging(select="last")], "add one to the Trainer"),
        (lambda: [ModelCheckpoint(dirpath=tmp_path / "c"), CheckpointAveraging(select="top_k")], "monitors none"),
        (lambda: [ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss"),
                  CheckpointAveraging(weighting="fisher")], "add CurvatureCapture"),
        (lambda: [ContinualMerge(state=str(tmp_path / "s"), base=str(wrong), strategy=Linear())],
         "has shape \\[2, 2\\]"),
    ]
    for make, match in cases:
        counter = CountSteps()
        with pytest.raises(ValueError, match=match):
            trainer(tmp_path, [*make(), counter], max_epochs=1).fit(Tiny(lr=1e-2), loader(), loader(16, 8, 1))
        assert counter.batches == 0, match
    with pytest.raises(ValueError, match="elects each entry's sign"):
        ContinualMerge(state=str(tmp_path / "s"), base=str(wrong), strategy=Ties())


def test_refitting_a_run_already_in_a_continual_state_fails_in_setup(tmp_path):
    base = _expert(tmp_path, seed=0, name="base.safetensors")
    run = tmp_path / "run"
    callback = ContinualMerge(state=str(tmp_path / "state"), base=str(base), strategy=Linear(), name="run-a")
    trainer(run, [callback], max_epochs=1).fit(Tiny(seed=0, lr=1e-2), loader())
    assert ContinualState(tmp_path / "state").count == 1
    counter = CountSteps()
    again = ContinualMerge(state=str(tmp_path / "state"), name="run-a")
    with pytest.raises(ValueError, match="already in"):
        trainer(run, [again, counter], max_epochs=1).fit(Tiny(seed=0, lr=1e-2), loader())
    assert counter.batches == 0


# -- LightningCLI --------------------------------------------------------------------------------------------------


def _cli_config(tmp_path, select="top_k"):
    base = _expert(tmp_path, seed=0, name="base.safetensors")
    other = _expert(tmp_path, seed=1)
    return textwrap.dedent(f"""
        trainer:
          max_epochs: 2
          accelerator: cpu
          logger: false
          enable_progress_bar: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {tmp_path}/ckpt, monitor: val_loss, save_top_k: 2}}
            - class_path: lightning_merge.callbacks.CurvatureCapture
              init_args: {{fisher_after_fit: example, fisher_examples: 8, compression: bfloat16}}
            - class_path: lightning_merge.callbacks.CheckpointAveraging
              init_args: {{select: {select}, k: 2, weighting: mwa}}
            - class_path: lightning_merge.callbacks.MergeOnFitEnd
              init_args:
                experts: [{other}]
                strategy: {{class_path: lightning_merge.Fisher, init_args: {{scale: 1.0}}}}
                on_missing_statistic: uniform
                out: {tmp_path}/merged.safetensors
            - class_path: lightning_merge.callbacks.ContinualMerge
              init_args:
                state: {tmp_path}/state
                base: {base}
                strategy: {{name: linear}}
        """)


def test_a_yaml_config_builds_the_four_callbacks_and_fits(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    (tmp_path / "config.yaml").write_text(_cli_config(tmp_path))
    cli = LightningCLI(Tiny, TinyData, args=["fit", "--config", str(tmp_path / "config.yaml"),
                                             "--model.lr", "0.05"], save_config_kwargs={"overwrite": True})
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for expected in ("CurvatureCapture", "CheckpointAveraging", "MergeOnFitEnd", "ContinualMerge"):
        assert expected in names
    assert (tmp_path / "merged.safetensors").exists() and (tmp_path / "ckpt" / "averaged.ckpt").exists()
    assert ContinualState(tmp_path / "state").count == 1


def test_a_typo_in_a_choice_fails_at_parse_time_naming_the_choices(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI

    (tmp_path / "config.yaml").write_text(_cli_config(tmp_path, select="topk"))
    with pytest.raises(SystemExit):
        LightningCLI(Tiny, TinyData, args=["fit", "--config", str(tmp_path / "config.yaml")])
    err = capsys.readouterr().err
    assert "Expected a typing.Literal['top_k', 'last', 'window', 'all']. Got value: topk" in err


def test_two_instances_of_a_callback_do_not_collide(tmp_path):
    a, b = _expert(tmp_path, 1, "a.safetensors"), _expert(tmp_path, 2, "b.safetensors")
    first = MergeOnFitEnd(experts=[str(a)], strategy=Linear(), out=str(tmp_path / "m1.safetensors"))
    second = MergeOnFitEnd(experts=[str(b)], strategy=Linear(), out=str(tmp_path / "m2.safetensors"),
                           load_merged=False)
    assert first.state_key != second.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [first, second, ckpt], max_epochs=1).fit(Tiny(lr=1e-2), loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert first.state_key in saved and second.state_key in saved


# -- the command line ----------------------------------------------------------------------------------------------


def test_dry_runs_print_the_plan_and_write_nothing(tmp_path, capsys):
    base = _expert(tmp_path, 0, "base.safetensors")
    experts = [_expert(tmp_path, i, f"e{i}.safetensors") for i in (1, 2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "ties", "base_model": str(base),
                                  "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "4 merged" in out and "e1.safetensors" in out and "files" in out
    assert not (tmp_path / "out").exists()
    ckpts = []
    for i in range(2):
        torch.save({"state_dict": Tiny(seed=i).state_dict(), "global_step": i}, tmp_path / f"c{i}.ckpt")
        ckpts.append(str(tmp_path / f"c{i}.ckpt"))
    assert main(["average", *ckpts, "--out", str(tmp_path / "avg.ckpt"), "--dry-run"]) == 0
    assert "weight 0.5000" in capsys.readouterr().out and not (tmp_path / "avg.ckpt").exists()
    assert read_info(ckpts[0]).digest != read_info(ckpts[1]).digest


@pytest.mark.slow
def test_piping_into_head_is_not_an_error(tmp_path):
    base = _expert(tmp_path, 0, "base.safetensors")
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear())
    for i in range(3):
        state.add(_expert(tmp_path, i + 1, f"e{i}.safetensors"))
    script = (f"{sys.executable} -m lightning_merge.cli.commands continual show {tmp_path / 'state'} --json | head -2")
    done = subprocess.run(script, shell=True, capture_output=True, text=True)
    assert done.stdout.count("\n") == 2 and "Traceback" not in done.stderr and "Broken" not in done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-merge ")


def test_mergekit_parameters_a_method_ignores_are_warned_not_refused(tmp_path, caplog):
    import logging

    from lightning_merge.tools.recipe import RecipeError, load_recipe

    base = _expert(tmp_path, 0, "base.safetensors")
    experts = [_expert(tmp_path, i, f"e{i}.safetensors") for i in (1, 2)]
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.3}} for e in experts]
    recipe.write_text(json.dumps({"merge_method": "linear", "models": models}))
    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        loaded = load_recipe(recipe)
    assert loaded.strategy == Linear(weights=[0.5, 0.5], normalize=True)
    assert "density is ignored by 'linear'" in caplog.text
    recipe.write_text(json.dumps({"merge_method": "ties", "base_model": str(base), "models": models,
                                  "parameters": {"topk": "model"}}))
    assert load_recipe(recipe).strategy.topk == "model"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": models, "parameters": {"densty": 0.3}}))
    with pytest.raises(RecipeError, match="densty is not a parameter of 'linear'"):
        load_recipe(recipe)


def test_names_are_the_paths_as_given_everywhere(tmp_path):
    base = _expert(tmp_path, 0, "base.safetensors")
    (tmp_path / "math").mkdir()
    (tmp_path / "code").mkdir()
    a = _expert(tmp_path / "math", 1, "last.safetensors")
    b = _expert(tmp_path / "code", 2, "last.safetensors")
    out = merge([a, b], base, Linear(), out=tmp_path / "out")
    assert json.loads((out / "lightning_merge.json").read_text())["experts"] == [str(a), str(b)]
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear())
    state.add(a)
    source = Expert(b)
    state.add(Expert({k: source.tensor(k) for k in source.names()}, name="in-memory run"))
    paths = [e["path"] for e in state.journal]
    assert paths[0] == str(a.resolve()) and paths[1] == "<in memory: in-memory run>"
