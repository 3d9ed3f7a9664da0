"""Distributed checkpoints (torch.distributed.checkpoint folders) as experts: read lazily tensor by tensor, equal to
the full state dict of the run that wrote them; merge, average, inspect and export-second-moments on them; a
missing shard, damaged metadata and a crafted ``.metadata`` refused by name, without running it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HELPERS, ROOT, run_sharded_script  # noqa: E402
from safetensors.torch import load_file, save_file

from lightning_merge import Expert, Linear, merge
from lightning_merge.cli.commands import main
from lightning_merge.errors import CheckpointError
from lightning_merge.sources.distcp import DistributedCheckpoint, optimizer_second_moments


def dcp_save(state: dict, folder: Path, meta: dict | None = None) -> Path:
    """A distributed checkpoint written by one process (no process group), with Lightning's ``meta.pt`` if given."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)
    if meta is not None:
        torch.save(meta, folder / "meta.pt")
    return folder


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"net.0.weight": torch.randn(5, 4, generator=g), "net.0.bias": torch.randn(5, generator=g),
            "net.1.weight": torch.randn(2, 5, generator=g).to(torch.bfloat16)}


def adam_state(names: list[str], step: float, beta2: float = 0.99) -> dict:
    g = torch.Generator().manual_seed(int(step))
    return {"state": {n: {"exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3, generator=g),
                          "step": torch.tensor(step)} for n in names},
            "param_groups": [{"lr": 0.1, "betas": (0.9, beta2), "eps": 1e-8, "params": list(names)}]}


# -- one process: the layouts Lightning and torch write ----------------------------------------------------------

def test_model_parallel_layout_reads_the_state_dict_only(tmp_path):
    """ModelParallelStrategy: {"state_dict": ..., "optimizer_0": ...} + meta.pt; the weights are the state_dict, the
    optimizer state is not a tensor of the expert."""
    sd = weights(0)
    folder = dcp_save({"state_dict": sd, "optimizer_0": adam_state(["net.0.weight"], 3.0)}, tmp_path / "last.ckpt",
                      {"epoch": 1, "global_step": 7})
    expert = Expert(folder)
    assert sorted(expert.names()) == sorted(sd)
    for name, value in sd.items():
        assert expert.spec(name).shape == tuple(value.shape) and expert.spec(name).dtype == value.dtype
        assert torch.equal(expert.tensor(name), value)
    assert Expert(folder, prefix="net.0.").names() == ["weight", "bias"]


def test_fsdp_sharded_layout_reads_model_as_the_state_dict(tmp_path):
    """FSDPStrategy(state_dict_type="sharded") saves the weights under "model" (with meta.pt): read like a .ckpt's
    state_dict, so prefix="net." strips the LightningModule's attribute as it does for a .ckpt."""
    sd = weights(1)
    folder = dcp_save({"model": sd, "optimizer_0": adam_state(["net.0.weight"], 2.0)}, tmp_path / "fsdp.ckpt",
                      {"epoch": 0, "global_step": 2})
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 2}, tmp_path / "same.ckpt")
    assert Expert(folder, prefix="net.").names() == Expert(tmp_path / "same.ckpt", prefix="net.").names()
    assert torch.equal(Expert(folder, prefix="net.").tensor("0.weight"), sd["net.0.weight"])


def test_plain_layouts_follow_the_rules_of_torch_save_files(tmp_path):
    """dcp.save(model.state_dict()): its tensors; {"model": ..., "ema": ...} without meta.pt: prefix chooses."""
    flat = dcp_save(weights(2), tmp_path / "flat")
    assert sorted(Expert(flat).names()) == sorted(weights(2))
    two = dcp_save({"model": weights(3), "ema": weights(4)}, tmp_path / "two")
    with pytest.raises(ValueError, match="several entries .'model', 'ema'."):
        Expert(two)
    ema = Expert(two, prefix="ema.")
    assert torch.equal(ema.tensor("net.0.bias"), weights(4)["net.0.bias"])


def test_merge_of_distributed_checkpoints_equals_merge_of_their_state_dicts(tmp_path):
    folders = [dcp_save({"state_dict": weights(s)}, tmp_path / f"e{s}.ckpt", {"global_step": s}) for s in (5, 6)]
    files = []
    for s in (5, 6):
        save_file(weights(s), tmp_path / f"e{s}.safetensors")
        files.append(tmp_path / f"e{s}.safetensors")
    got = merge(folders, strategy=Linear(weights=[1.0, 3.0]))
    want = merge(files, strategy=Linear(weights=[1.0, 3.0]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_merge_written_as_ckpt_keeps_the_checkpoints_metadata(tmp_path):
    """The output .ckpt takes meta.pt's epoch and step as it takes a .ckpt template's (no optimizer state)."""
    folders = [dcp_save({"state_dict": weights(s), "optimizer_0": adam_state(["net.0.bias"], 4.0)},
                        tmp_path / f"e{s}.ckpt", {"epoch": 2, "global_step": 40 + s}) for s in (7, 8)]
    merge(folders, strategy=Linear(), out=tmp_path / "merged.ckpt")
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert saved["global_step"] == 47 and saved["epoch"] == 2 and "optimizer_states" not in saved
    mean = (weights(7)["net.0.weight"] + weights(8)["net.0.weight"]) / 2
    torch.testing.assert_close(saved["state_dict"]["net.0.weight"], mean, rtol=0, atol=1e-6)


def test_a_merge_written_as_a_folder_copies_no_shard_of_the_inputs(tmp_path):
    folders = [dcp_save({"state_dict": weights(s)}, tmp_path / f"e{s}.ckpt", {"global_step": s}) for s in (1, 2)]
    out = merge(folders, strategy=Linear(), out=tmp_path / "merged")
    held = sorted(p.name for p in Path(out).iterdir())
    assert not [n for n in held if n.endswith(".distcp") or n == "meta.pt" or n == ".metadata"], held
    assert torch.equal(load_file(Path(out) / "model.safetensors")["net.0.bias"],
                       merge(folders, strategy=Linear())["net.0.bias"])


def test_continual_add_of_distributed_checkpoints_equals_adding_their_state_dicts(tmp_path):
    from lightning_merge import ContinualState, TaskArithmetic

    save_file(weights(0), tmp_path / "base.safetensors")
    folded = []
    for kind in ("dcp", "file"):
        state = ContinualState.create(tmp_path / kind, base=tmp_path / "base.safetensors",
                                      strategy=TaskArithmetic(scale=0.5))
        for s in (1, 2):
            if kind == "dcp":
                state.add(dcp_save({"state_dict": weights(s)}, tmp_path / f"e{s}.ckpt", {"global_step": s}))
            else:
                save_file(weights(s), tmp_path / f"e{s}.safetensors")
                state.add(tmp_path / f"e{s}.safetensors")
        folded.append(state.state_dict())
    assert folded[0].keys() == folded[1].keys() and all(torch.equal(folded[0][k], folded[1][k]) for k in folded[1])


def test_second_moments_from_the_optimizer_state(tmp_path):
    names = ["net.0.weight", "net.0.bias"]
    optim = adam_state(names, 5.0, beta2=0.95)
    optim["state"]["net.1.weight"] = {"exp_avg_sq": torch.rand(2), "step": torch.tensor(0.0)}  # never stepped
    optim["param_groups"][0]["params"].append("net.1.weight")
    folder = dcp_save({"state_dict": weights(0), "optimizer_0": optim}, tmp_path / "last.ckpt", {"global_step": 5})
    stats = optimizer_second_moments(folder)
    assert sorted(stats.names("exp_avg_sq")) == sorted(names)
    assert stats.kinds["exp_avg_sq"]["beta2"] == 0.95 and stats.kinds["exp_avg_sq"]["unstepped"] == ["net.1.weight"]
    raw = optim["state"]["net.0.bias"]["exp_avg_sq"]
    assert torch.equal(stats.raw("net.0.bias", "exp_avg_sq"), raw)
    torch.testing.assert_close(stats.get("net.0.bias", "exp_avg_sq"), raw / (1 - 0.95**5))
    assert main(["export-second-moments", str(folder), str(tmp_path / "v.safetensors"), "--strip-prefix", "net."]) == 0
    exported = load_file(tmp_path / "v.safetensors")
    assert sorted(exported) == ["0.bias", "0.weight"] and torch.equal(exported["0.bias"], raw)
    bare = dcp_save({"state_dict": weights(0)}, tmp_path / "weights-only.ckpt", {})
    with pytest.raises(CheckpointError, match="no Adam second moments"):
        optimizer_second_moments(bare)


# -- refused, by name ------------------------------------------------------------------------------------------

def test_a_crafted_metadata_is_refused_without_running_it(tmp_path):
    """.metadata is a pickle: one that calls os.system is refused, and the call never happens."""
    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    (folder / "__0_0.distcp").write_bytes(b"")
    for opener in (Expert, DistributedCheckpoint):
        with pytest.raises(CheckpointError, match=r"evil.ckpt/.metadata' .*os.system.*refused, not run"):
            opener(folder)
    assert not marker.exists()


def test_a_crafted_metadata_class_outside_the_format_is_refused(tmp_path):
    """Any global that is not a class of the format is refused (here a class of the standard library with a
    side-effecting constructor)."""
    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(subprocess.Popen.__init__))
    with pytest.raises(CheckpointError, match="subprocess"):
        Expert(folder)


def test_damaged_checkpoints_are_refused_by_name(tmp_path):
    folder = dcp_save({"state_dict": weights(0)}, tmp_path / "ck.ckpt", {})
    shards = tmp_path / "shards-only"
    shards.mkdir()
    shutil.copy(folder / "__0_0.distcp", shards)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp.*no '.metadata'.*copy the whole folder"):
        Expert(shards)
    truncated = tmp_path / "truncated.ckpt"
    shutil.copytree(folder, truncated)
    data = (truncated / "__0_0.distcp").read_bytes()
    (truncated / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp' is truncated: tensor 'state_dict.net"):
        Expert(truncated)
    overlap = tmp_path / "overlap.ckpt"
    shutil.copytree(folder, overlap)
    metadata = pickle.loads((overlap / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    entry = metadata.state_dict_metadata["state_dict.net.0.weight"]
    entry.chunks[0].sizes = torch.Size([3, 4])  # covers 12 of 20 entries
    (overlap / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"tensor 'state_dict.net.0.weight' hold 12 of its 20 entries"):
        Expert(overlap)


# -- two processes, FSDP2 through Lightning --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One 2-process CPU fit (ModelParallelStrategy + fully_shard) for the whole module: its distributed checkpoints
    at steps 2 and 4 (and last.ckpt), and the full state dicts and second moments gathered at those steps."""
    out = tmp_path_factory.mktemp("distcp-fit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = run_sharded_script([sys.executable, str(HELPERS / "distcp_fit.py"), str(out)], out, env=env, cwd=out,
                              timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_experts_of_a_sharded_fit_equal_its_full_state_dict(fitted):
    for step in (2, 4):
        folder = fitted / "ck" / f"step={step}.ckpt"
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        reference = load_file(fitted / "ref" / f"step={step}.safetensors")
        expert = Expert(folder)
        assert sorted(expert.names()) == sorted(reference)  # weights only: no optimizer state
        for name, value in reference.items():
            got = expert.tensor(name)
            assert got.dtype == value.dtype and torch.equal(got, value), name
        stripped = Expert(folder, prefix="model.")
        assert torch.equal(stripped.tensor("4.weight"), reference["model.4.weight"])  # 1 row on 2 ranks: 1 + 0


@pytest.mark.slow
def test_merge_of_sharded_experts_equals_merge_of_their_state_dicts(fitted, tmp_path):
    folders = [fitted / "ck" / f"step={s}.ckpt" for s in (2, 4)]
    files = [fitted / "ref" / f"step={s}.safetensors" for s in (2, 4)]
    got = merge(folders, strategy=Linear(weights=[1.0, 2.0]))
    want = merge(files, strategy=Linear(weights=[1.0, 2.0]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(load_file(files[0])["model.0.weight"], load_file(files[1])["model.0.weight"])


@pytest.mark.slow
def test_cli_inspect_and_merge_on_sharded_checkpoints(fitted, tmp_path, capsys):
    folder = fitted / "ck" / "step=4.ckpt"
    assert main(["inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "tensors     8" in shown and "parameters  53" in shown
    assert "distributed checkpoint, 2 shard files, step 4; optimizer exp_avg_sq for 6 tensors" in shown
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["distributed_checkpoint"] == {"shard_files": 2, "global_step": 4, "epoch": 0, "exp_avg_sq": 6}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        merge_method: linear
        models:
          - model: {fitted / "ck" / "step=2.ckpt"}
            parameters: {{weight: 1.0}}
          - model: {folder}
            parameters: {{weight: 3.0}}
        """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lightning_merge", "merge", str(recipe), str(tmp_path / "out.ckpt"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = torch.load(tmp_path / "out.ckpt", weights_only=True)
    want = merge([fitted / "ref" / f"step={s}.safetensors" for s in (2, 4)], strategy=Linear(weights=[1.0, 3.0]))
    assert written["state_dict"].keys() == want.keys()
    assert all(torch.equal(written["state_dict"][k], want[k]) for k in want)
    assert written["global_step"] == 2  # the first expert's meta.pt is the template


@pytest.mark.slow
def test_average_and_second_moments_of_sharded_checkpoints(fitted, tmp_path, capsys):
    from lightning_merge.tools.averaging import average_checkpoints, distinct_checkpoints, read_info

    ck = fitted / "ck"
    infos = [read_info(ck / n) for n in ("step=2.ckpt", "step=4.ckpt", "last.ckpt")]
    assert [i.global_step for i in infos] == [2, 4, 4]
    kept, skipped = distinct_checkpoints(infos)
    assert [i.path.name for i in kept] == ["step=2.ckpt", "step=4.ckpt"]
    assert skipped == [(ck / "last.ckpt", f"a copy of '{ck / 'step=4.ckpt'}' (same weights)")]
    assert main(["average", str(ck / "step=2.ckpt"), str(ck / "step=4.ckpt"), "--out", str(tmp_path / "avg.ckpt")]) == 0
    saved = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    refs = [load_file(fitted / "ref" / f"step={s}.safetensors") for s in (2, 4)]
    state, _ = average_checkpoints([ck / "step=2.ckpt", ck / "step=4.ckpt"])
    for name in refs[0]:
        if refs[0][name].is_floating_point():
            torch.testing.assert_close(saved["state_dict"][name], (refs[0][name] + refs[1][name]) / 2)
        assert torch.equal(saved["state_dict"][name], state[name])
    assert saved["global_step"] == 4 and "optimizer_states" not in saved and "loops" not in saved
    # The optimizer's exp_avg_sq, exported from the checkpoint without a sidecar: equal to the gathered one.
    moments = torch.load(fitted / "ref" / "step=4.exp_avg_sq.pt", weights_only=True)
    assert main(["export-second-moments", str(ck / "step=4.ckpt"), str(tmp_path / "v.safetensors")]) == 0
    exported = load_file(tmp_path / "v.safetensors")
    assert sorted(exported) == sorted(moments)
    for name, entry in moments.items():
        assert torch.equal(exported[name], entry["exp_avg_sq"]), name
    stats = optimizer_second_moments(ck / "step=4.ckpt")
    assert stats.kinds["exp_avg_sq"]["beta2"] == 0.95 and stats.kinds["exp_avg_sq"]["step"] == 4


@pytest.mark.slow
def test_a_missing_shard_is_named(fitted, tmp_path, capsys):
    folder = tmp_path / "partial.ckpt"
    shutil.copytree(fitted / "ck" / "step=2.ckpt", folder)
    (folder / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"'.*partial.ckpt' is missing its shard file '__1_0.distcp'"):
        Expert(folder)
    assert main(["inspect", str(folder)]) != 0
    assert "is missing its shard file '__1_0.distcp'" in capsys.readouterr().err
