"""OPCM (sanity properties, the projection against its full-SVD definition) and the continual state: folding
experts one at a time equals merging them at once, journal, duplicates, other bases, crashes, concurrency, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import rand, tiny_base, write_family
from safetensors.torch import save_file

from lightning_merge import (
    OPCM,
    OTA,
    Consensus,
    ContinualState,
    Expert,
    Fisher,
    Linear,
    TaskArithmetic,
    Ties,
    WeightedMedian,
    merge,
)
from lightning_merge.continual.state import ContinualError
from lightning_merge.files.ownership import ForeignOutput
from lightning_merge.formats.sidecar import write_statistics
from lightning_merge.strategies.opcm import opcm_project


def full_svd_projection(prev, tau, alpha):
    """FusionBench's formulation: full SVD, P = Uᵀ τ V, zero the diagonal and the top-left r×r block."""
    u, s, vh = torch.linalg.svd(prev, full_matrices=True)
    r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ tau @ vh.T
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    return u @ p @ vh


def test_projection_equals_the_full_svd_definition_on_full_rank_matrices():
    for seed, alpha in ((0, 0.5), (1, 0.2), (2, 0.9)):
        prev, tau = rand(6, 4, seed=seed), rand(6, 4, seed=seed + 50)
        torch.testing.assert_close(
            opcm_project(prev, tau, alpha), full_svd_projection(prev, tau, alpha), rtol=1e-4, atol=1e-5
        )
    # a τ inside span{uᵢvᵢᵀ} (diagonal in the singular basis) adds nothing
    prev = rand(5, 5, seed=9)
    u, s, vh = torch.linalg.svd(prev)
    inside = u @ torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0])) @ vh
    assert opcm_project(prev, inside, 0.5).abs().max() < 1e-4


def test_projection_on_rank_deficient_matrices_keeps_the_null_directions():
    """Where σᵢ ≤ 1e-6·σ₁ the singular vectors are arbitrary, so their diagonal entries stay; the rest as defined
    (the block and the diagonal of M = Uᵀ τ V removed), wide and tall, at several α."""
    for seed, shape, alpha in ((0, (10, 16), 0.5), (1, (16, 10), 0.3), (2, (12, 12), 0.9), (3, (9, 14), 1.0)):
        prev, tau = rand(*shape, seed=seed), rand(*shape, seed=seed + 50)
        prev[:, :4] = 0  # rank at most min(shape) − 4 (wide) or the columns lost (tall)
        prev[:3] = 0
        u, s, vh = torch.linalg.svd(prev, full_matrices=False)
        r = 0 if alpha >= 1 else int((s.cumsum(0) / s.sum() > alpha).float().argmax())
        m = u.T @ tau @ vh.T
        mask = torch.zeros_like(m, dtype=torch.bool)
        mask[:r, :r] = True
        significant = s > 1e-6 * s[0]
        mask.diagonal().copy_(mask.diagonal() | significant)
        assert not significant.all()
        expected = tau - u @ (m * mask) @ vh
        torch.testing.assert_close(opcm_project(prev, tau, alpha), expected, rtol=1e-4, atol=1e-5)


def test_projection_at_alpha_one_or_above_removes_only_the_diagonal():
    """α ≥ 1: no cumulative share exceeds α, r = 0, whatever float32 rounding does to the last share."""
    for seed in range(40):  # FusionBench's float32 argmax would give r = k − 1 on about a fifth of these
        prev, tau = rand(12, 8, seed=seed), rand(12, 8, seed=seed + 500)
        u, s, vh = torch.linalg.svd(prev, full_matrices=False)
        m = u.T @ tau @ vh.T
        expected = tau - u @ torch.diag(torch.diagonal(m)) @ vh
        for alpha in (1.0, 1.5):
            torch.testing.assert_close(opcm_project(prev, tau, alpha), expected, rtol=1e-4, atol=1e-5)


def test_opcm_sanity(tmp_path):
    base_path, paths = write_family(tmp_path, stats=False)
    base = Expert(base_path)
    one = merge([paths[0]], base=base, strategy=OPCM())
    for name, value in one.items():
        torch.testing.assert_close(value, Expert(paths[0]).tensor(name))  # t = 1 returns expert 1
    norms = []
    for t in range(1, 5):
        merged = merge(paths[:t], base=base, strategy=OPCM(alpha=0.5))
        norms.append(
            math.sqrt(
                sum(
                    float((Expert(p).tensor(n) - base.tensor(n)).square().sum())
                    for p in paths[t - 1 : t]
                    for n in merged
                    if merged[n].is_floating_point()
                )
            )
        )
        got = math.sqrt(
            sum(float((merged[n] - base.tensor(n)).square().sum()) for n in merged if merged[n].is_floating_point())
        )
        assert got == pytest.approx(sum(norms) / len(norms), rel=1e-5)  # ‖θ⁽ᵗ⁾ − θ₀‖ = n̄ₜ
    forward = merge(paths, base=base, strategy=OPCM())
    backward = merge(paths[::-1], base=base, strategy=OPCM())
    assert not torch.allclose(forward["layer.0.weight"], backward["layer.0.weight"])  # order matters


def test_opcm_default_projects_the_output_head_and_not_the_embedding():
    """FusionBench projects every nn.Linear (lm_head included) and adds embeddings as they are: the default does
    the same. Two experts by hand: S = τ₁ + Proj_{τ₁}(τ₂) for a projected tensor, τ₁ + τ₂ otherwise, then
    θ = θ₀ + n̄·S/‖S‖ with n̄ the mean of the experts' global task-vector norms."""
    from lightning_merge.strategies.opcm import DEFAULT_NOT_LINEAR, is_projected

    names = {"model.embed_tokens.weight": (11, 6), "model.layers.0.mlp.up_proj.weight": (9, 6),
             "lm_head.weight": (11, 6), "model.norm.weight": (6,)}
    base = {k: rand(*shape, seed=i) for i, (k, shape) in enumerate(names.items())}
    experts = [{k: v + 0.1 * rand(*v.shape, seed=10 * j + i) for i, (k, v) in enumerate(base.items())}
               for j in (1, 2)]
    assert is_projected("lm_head.weight", base["lm_head.weight"])
    assert not is_projected("model.embed_tokens.weight", base["model.embed_tokens.weight"])
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    total = {k: taus[0][k] + (opcm_project(taus[0][k], taus[1][k], 0.5) if k.endswith("proj.weight")
                              or k == "lm_head.weight" else taus[1][k]) for k in base}
    mean_norm = sum(math.sqrt(sum(float(t[k].square().sum()) for k in base)) for t in taus) / 2
    norm = math.sqrt(sum(float(v.square().sum()) for v in total.values()))
    got = merge(experts, base=base, strategy=OPCM(alpha=0.5, device="cpu"))
    for k in base:
        torch.testing.assert_close(got[k], base[k] + total[k] * (mean_norm / norm), rtol=1e-5, atol=1e-6)
    # the earlier default (lm_head skipped) stays one argument away, and differs on the head
    skipped = merge(experts, base=base, strategy=OPCM(alpha=0.5, device="cpu", not_linear=DEFAULT_NOT_LINEAR
                                                      + "|lm_head"))
    assert float((skipped["lm_head.weight"] - got["lm_head.weight"]).abs().max()) > 1e-3


def test_opcm_device_choice(tmp_path):
    """OPCM(device=...): a bad name is refused at construction, "cuda" without a GPU is refused when the merge
    resolves it (naming the argument and the remedy), and the SVDs on an explicit device give the default's
    model: on the CPU exactly; on a GPU, when this machine has one, within float32 SVD noise."""
    from lightning_merge.strategies.checks import compute_device

    with pytest.raises(ValueError, match="OPCM.device must be"):
        OPCM(device="not-a-device")
    assert compute_device("OPCM", "cpu") == torch.device("cpu")
    assert compute_device("OPCM", None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_path, paths = write_family(tmp_path, stats=False)
    default = merge(paths, base=base_path, strategy=OPCM(alpha=0.5))
    on_cpu = merge(paths, base=base_path, strategy=OPCM(alpha=0.5, device="cpu"))
    if not torch.cuda.is_available():
        assert all(torch.equal(default[n], on_cpu[n]) for n in default)
        with pytest.raises(ValueError, match=r"OPCM\(device='cuda'\): no CUDA device"):
            merge(paths, base=base_path, strategy=OPCM(alpha=0.5, device="cuda"))
    else:  # the GPU's SVDs: the same model within float32 noise, on the tensors' own device (the CPU)
        on_gpu = merge(paths, base=base_path, strategy=OPCM(alpha=0.5, device="cuda"))
        for n in on_cpu:
            assert on_gpu[n].device.type == "cpu"
            torch.testing.assert_close(on_gpu[n], on_cpu[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "strategy",
    [
        Linear(),
        TaskArithmetic(scale=0.7),
        Fisher(estimator="batch", scale=1.3),
        Fisher(normalize=False),
        OTA(power=0.5),
        OPCM(alpha=0.4),
    ],
    ids=["average", "task_arithmetic", "fisher", "fisher-no-norm", "ota", "opcm"],
)
def test_folding_one_at_a_time_equals_merging_at_once(tmp_path, strategy):
    base_path, paths = write_family(tmp_path)
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=strategy)
    for p in paths:
        state.add(p)
    at_once = merge(paths, base=base_path, strategy=strategy)
    folded = state.state_dict()
    for name, value in at_once.items():
        torch.testing.assert_close(folded[name], value, rtol=1e-5, atol=1e-6)
    assert [e["order"] for e in state.journal] == [1, 2, 3, 4]
    assert len(list((tmp_path / "state" / "generations").iterdir())) == 1  # old generations removed


def test_an_ota_state_written_before_bias_correct_existed_keeps_folding_the_corrected_moments(tmp_path):
    """OTA's default second-moment form became the raw v; a state whose state.json has no ``bias_correct`` folded
    v̂ and goes on doing so (with experts of unequal steps, mixing the forms would give neither merge)."""
    base_path, paths = write_family(tmp_path)
    for i, p in enumerate(paths):  # unequal numbers of steps: the two forms weigh the experts apart
        stats = Expert(p).statistics
        write_statistics(tmp_path / f"e{i}.statistics.safetensors",
                         {"exp_avg_sq": {n: stats.raw(n, "exp_avg_sq") for n in stats.names("exp_avg_sq")}},
                         {"exp_avg_sq": {"beta2": 0.999, "step": (50, 400, 3000, 20)[i]}})
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=OTA(bias_correct=True))
    state.add(paths[0])
    config_path = tmp_path / "state" / "state.json"
    config = json.loads(config_path.read_text())
    del config["strategy"]["bias_correct"]  # as an older version wrote it
    config_path.write_text(json.dumps(config))
    reopened = ContinualState(tmp_path / "state")
    for p in paths[1:]:
        reopened.add(p)
    assert reopened.strategy == OTA(bias_correct=True) and OTA() == OTA(bias_correct=False)
    corrected = merge(paths, base=base_path, strategy=OTA(bias_correct=True))
    raw = merge(paths, base=base_path, strategy=OTA())
    for name, value in corrected.items():
        torch.testing.assert_close(reopened.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(corrected[n], raw[n], rtol=1e-3, atol=1e-4) for n in raw)


def test_duplicates_other_bases_and_missing_statistics_are_refused(tmp_path):
    base_path, paths = write_family(tmp_path)
    with pytest.raises(ContinualError, match="elects each entry's sign over all experts"):
        ContinualState.create(tmp_path / "ties", base=base_path, strategy=Ties())
    with pytest.raises(ContinualError, match="no continual form"):
        ContinualState.create(tmp_path / "median", base=base_path, strategy=WeightedMedian())
    with pytest.raises(ContinualError, match="consensus mask"):
        ContinualState.create(tmp_path / "consensus", base=base_path, strategy=Consensus())
    assert not (tmp_path / "ties").exists()
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=Fisher())
    state.add(paths[0])
    with pytest.raises(ContinualError, match="already merged"):
        state.add(paths[0])
    state.add(paths[0], allow_duplicate=True)
    assert state.count == 2
    bad = {
        "layer.0.weight": rand(6, 4),
        "layer.0.bias": rand(6),
        "embed.weight": rand(7, 5),
        "steps": torch.tensor([3]),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ContinualError, match="has shape \\[6, 4\\], the base \\[6, 5\\]"):
        state.add(tmp_path / "bad.safetensors")
    save_file({"other": rand(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ContinualError, match="lacks 4 tensor"):
        state.add(tmp_path / "other.safetensors")
    from lightning_merge import StatisticsError

    save_file({k: Expert(paths[1]).tensor(k) for k in Expert(paths[1]).names()}, str(tmp_path / "nostats.safetensors"))
    with pytest.raises(StatisticsError, match="no 'fisher' statistics"):
        state.add(tmp_path / "nostats.safetensors")
    assert state.count == 2  # nothing half-added


def test_another_base_is_detected_from_the_capture_fingerprint(tmp_path):
    base_path, paths = write_family(tmp_path, stats=False)
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=Linear())
    fp = {"layer.0.weight": "0" * 16}
    write_statistics(
        tmp_path / "e1.statistics.safetensors", {"fisher.batch": {}}, {}, metadata={"base_fingerprint": json.dumps(fp)}
    )
    with pytest.raises(ContinualError, match="fine-tuned from another base"):
        state.add(paths[1])


def test_a_crash_before_the_commit_leaves_the_previous_state_and_the_add_can_be_retried(tmp_path, monkeypatch):
    base_path, paths = write_family(tmp_path, stats=False)
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=Linear())
    state.add(paths[0])
    before = state.state_dict()
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("CURRENT"):
            raise OSError("simulated crash at the commit point")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        state.add(paths[1])
    monkeypatch.setattr(os, "replace", real_replace)
    assert state.count == 1
    for name, value in before.items():
        assert torch.equal(state.state_dict()[name], value)
    state.add(paths[1])  # the retry cleans up and succeeds
    assert state.count == 2
    assert not any(p.name.startswith(".") for p in (tmp_path / "state" / "generations").iterdir())


@pytest.mark.slow
def test_two_processes_adding_at_once_lose_neither_expert(tmp_path):
    base_path, paths = write_family(tmp_path, n=4, stats=False)
    ContinualState.create(tmp_path / "state", base=base_path, strategy=Linear())
    code = "import sys; from lightning_merge import ContinualState; ContinualState(sys.argv[1]).add(sys.argv[2])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state"), str(p)]) for p in paths]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    state = ContinualState(tmp_path / "state")
    assert state.count == 4 and sorted(e["order"] for e in state.journal) == [1, 2, 3, 4]
    at_once = merge(paths, base=base_path, strategy=Linear())
    for name, value in at_once.items():
        torch.testing.assert_close(state.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_cli_continual(tmp_path, capsys):
    from lightning_merge.cli.commands import main

    base_path, paths = write_family(tmp_path, stats=False)
    s = str(tmp_path / "state")
    assert main(["continual", "init", s, "--base", str(base_path), "--strategy", "opcm", "--set", "alpha=0.3"]) == 0
    for p in paths[:2]:
        assert main(["continual", "add", s, str(p)]) == 0
    assert main(["continual", "add", s, str(paths[0])]) == 2  # duplicate refused
    capsys.readouterr()
    assert main(["continual", "show", s, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 2 and info["strategy"]["alpha"] == 0.3 and len(info["journal"]) == 2
    expected = merge(paths[:2], base=base_path, strategy=OPCM(alpha=0.3))
    got = Expert(tmp_path / "state" / "current" / "model")
    torch.testing.assert_close(got.tensor("layer.0.weight"), expected["layer.0.weight"], rtol=1e-5, atol=1e-6)


def test_continual_merge_callback_folds_each_run(tmp_path):
    from capture_helpers import Tiny, loader, trainer

    from lightning_merge.callbacks import ContinualMerge, CurvatureCapture

    base = tiny_base(tmp_path)
    state_dir = tmp_path / "state"
    finals = []
    for s in range(3):
        callbacks = [
            CurvatureCapture(),
            ContinualMerge(
                state=str(state_dir), base=str(base), strategy=Fisher(), name=f"run{s}", load_merged=(s == 2)
            ),
        ]
        model = Tiny(lr=5e-2)
        trainer(tmp_path / f"run{s}", callbacks, max_epochs=1).fit(model, loader(32, 8, seed=s))
        finals.append(tmp_path / f"run{s}" / "final.safetensors")
    state = ContinualState(state_dir)
    assert [e["name"] for e in state.journal] == ["run0", "run1", "run2"]
    at_once = merge(finals, base=base, strategy=Fisher())
    for name, value in at_once.items():
        torch.testing.assert_close(state.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)  # load_merged


@pytest.mark.slow
def test_continual_merge_under_ddp(tmp_path):
    from capture_helpers import Tiny, ddp_loader, trainer

    from lightning_merge.callbacks import ContinualMerge

    base = tiny_base(tmp_path)
    trainer(
        tmp_path / "run",
        [ContinualMerge(state=str(tmp_path / "state"), base=str(base), strategy=OPCM())],
        max_epochs=1,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    ).fit(Tiny(lr=5e-2), ddp_loader(32, 4))
    assert ContinualState(tmp_path / "state").count == 1  # rank 0 added once


def test_parallel_fold_keeps_workers_busy_within_its_byte_bound_and_in_order():
    """Large tensors alternating with small ones run two at a time (a slot frees when a tensor finishes, not when
    its turn to be yielded comes); bytes in flight stay within threads × the largest; results come in order; an
    error is raised and the queued tensors are cancelled."""
    import threading
    import time

    from lightning_merge.continual.state import parallel_map

    names = [f"{kind}{i}" for i in range(6) for kind in ("w", "b")]
    sizes = [1000 if n.startswith("w") else 1 for n in names]
    lock = threading.Lock()
    state = {"bytes": 0, "peak_bytes": 0, "large": 0, "peak_large": 0}

    def fold(name):
        size = 1000 if name.startswith("w") else 1
        with lock:
            state["bytes"] += size
            state["peak_bytes"] = max(state["peak_bytes"], state["bytes"])
            state["large"] += size == 1000
            state["peak_large"] = max(state["peak_large"], state["large"])
        time.sleep(0.05 if size == 1000 else 0.0)
        with lock:
            state["bytes"] -= size
            state["large"] -= size == 1000
        return name

    assert list(parallel_map(fold, names, sizes, "t", False, 2)) == names
    assert state["peak_large"] == 2 and state["peak_bytes"] <= 2000

    ran = []

    def failing(name):
        ran.append(name)
        if name == "w1":
            raise RuntimeError("tensor w1 broke")
        time.sleep(0.02)
        return name

    with pytest.raises(RuntimeError, match="w1 broke"):
        list(parallel_map(failing, names, sizes, "t", False, 2))
    assert len(ran) < len(names)


# -- never lose or expose a user's data (issue 27) ------------------------------------------------------------------


def _state_with(tmp_path, n_added=1, strategy=None, **create):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base_path, paths = write_family(tmp_path, stats=False)
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=strategy or Linear(), **create)
    for p in paths[:n_added]:
        state.add(p)
    return state, base_path, paths


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` (not following links) with a file's bytes: what must survive untouched."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_a_state_whose_folders_are_links_is_refused_and_nothing_they_point_to_is_deleted(tmp_path):
    """Issue 27 #4: with generations/ a link to a shared folder, an add deleted the shared folder's other contents.
    Now a state's own files and folders may not be links (refused naming the link, reading or adding), a generation
    that is a link is refused at the next add, and whatever else lies in generations/ is never removed."""
    state, base_path, paths = _state_with(tmp_path)
    folder = tmp_path / "state"
    shared = tmp_path / "shared"
    (shared / "000007").mkdir(parents=True)  # named like a generation, and another folder and file
    (shared / "000007" / "data.bin").write_bytes(b"someone else's")
    (shared / "other").mkdir()
    (shared / "keep.txt").write_text("keep")
    before = _tree(shared)
    shutil.copytree(folder / "generations", shared, dirs_exist_ok=True)
    shutil.rmtree(folder / "generations")
    os.symlink(shared, folder / "generations")
    with pytest.raises(ContinualError, match="generations' is a symbolic link .* replace the link by a copy"):
        ContinualState(folder).add(paths[1])
    with pytest.raises(ContinualError, match="generations' is a symbolic link"):
        ContinualState(folder).describe()
    assert {k: v for k, v in _tree(shared).items() if k in before} == before

    for name in ("CURRENT", ".lock", "state.json"):  # any of the state's own files
        state, base_path, paths = _state_with(tmp_path / name)
        own = tmp_path / name / "state" / name
        elsewhere = tmp_path / name / f"elsewhere-{name}"
        shutil.move(own, elsewhere)
        os.symlink(elsewhere, own)
        kept = elsewhere.read_bytes()
        with pytest.raises(ContinualError, match=f"'{own}' is a symbolic link"):
            ContinualState(tmp_path / name / "state").add(paths[1])
        assert elsewhere.read_bytes() == kept

    # a generation that is a link (to a backup, say) is refused at the next add, and its target kept
    state, base_path, paths = _state_with(tmp_path / "gen")
    gens = tmp_path / "gen" / "state" / "generations"
    backup = tmp_path / "gen" / "backup"
    shutil.move(gens / "000001", backup)
    os.symlink(backup, gens / "000001")
    kept = _tree(backup)
    assert ContinualState(tmp_path / "gen" / "state").count == 1  # reading through it is harmless
    with pytest.raises(ContinualError, match="000001' is a symbolic link"):
        ContinualState(tmp_path / "gen" / "state").add(paths[1])
    assert _tree(backup) == kept


def test_an_add_removes_only_the_generations_the_state_named(tmp_path):
    state, base_path, paths = _state_with(tmp_path)
    gens = tmp_path / "state" / "generations"
    (gens / "notes.txt").write_text("mine")
    (gens / "experiments").mkdir()
    (gens / "experiments" / "run.log").write_text("mine too")
    (gens / ".partial-1-0123abcd").mkdir()  # what a crashed add leaves: removed
    (gens / "000005").mkdir()  # a generation never committed: removed
    state.add(paths[1])
    assert sorted(p.name for p in gens.iterdir()) == ["000002", "experiments", "notes.txt"]
    assert (gens / "experiments" / "run.log").read_text() == "mine too"
    # a `current` that is neither the state's link nor a copy of a generation is not deleted
    (tmp_path / "state" / "current").unlink()
    (tmp_path / "state" / "current").mkdir()
    (tmp_path / "state" / "current" / "thesis.tex").write_text("mine")
    with pytest.raises(ContinualError, match="current' is not the state's link"):
        state.add(paths[2])
    assert (tmp_path / "state" / "current" / "thesis.tex").read_text() == "mine"


def test_a_state_is_created_only_in_a_new_or_empty_folder(tmp_path):
    base_path, paths = write_family(tmp_path, stats=False)
    expert_folder = tmp_path / "expert"
    expert_folder.mkdir()
    save_file({k: Expert(paths[0]).tensor(k) for k in Expert(paths[0]).names()},
              str(expert_folder / "model.safetensors"))
    before = _tree(expert_folder)
    with pytest.raises(ForeignOutput, match="expert' holds files and no continual state \\(model.safetensors\\)"):
        ContinualState.create(expert_folder, base=base_path, strategy=Linear())
    assert _tree(expert_folder) == before  # not even a lock file
    with pytest.raises(ContinualError, match="is a file"):
        ContinualState.create(paths[0], base=base_path, strategy=Linear())
    (tmp_path / "empty").mkdir()
    ContinualState.create(tmp_path / "empty", base=base_path, strategy=Linear()).add(paths[0])
    # an expert inside a state's folder (its merged model, which the next add replaces) is refused
    state = ContinualState(tmp_path / "empty")
    with pytest.raises(ContinualError, match="is inside the continual state"):
        state.add(state.model_path)
    assert state.count == 1


def _family_with(tmp_path, change):
    """The family of write_family plus one expert changed by ``change(tensors)``."""
    base_path, paths = write_family(tmp_path, stats=False)
    tensors = {k: Expert(paths[1]).tensor(k) for k in Expert(paths[1]).names()}
    change(tensors)
    save_file(tensors, str(tmp_path / "changed.safetensors"))
    return base_path, paths, tmp_path / "changed.safetensors"


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update({"head.weight": torch.ones(2, 5)}), "tensor 'head.weight' is in '.*changed.safetensors' but "
                                                            "not in the base"),
    (lambda t: t.update({"steps": torch.tensor([9])}), "non-floating tensor 'steps' differs between the base"),
    (lambda t: t.update({"steps": torch.tensor([3.0])}), "tensor 'steps' is floating point and the base's is not"),
    (lambda t: t.update({"layer.0.bias": torch.arange(6)}), "tensor 'layer.0.bias' is not floating point and the "
                                                            "base's is"),
], ids=["a new head", "a changed integer buffer", "an integer become float", "a float become integer"])
def test_a_continual_add_refuses_what_the_batch_merge_refuses(tmp_path, change, match):
    """Issue 27 #11: an extra tensor or a changed integer buffer was dropped or kept without a word, where the batch
    merge refuses it. One path, one answer: the same inputs are refused, before anything is written."""
    base_path, paths, changed = _family_with(tmp_path, change)
    with pytest.raises(ValueError):
        merge([paths[0], changed], base=base_path, strategy=Linear())
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=Linear())
    state.add(paths[0])
    before = state.state_dict()
    with pytest.raises(ContinualError, match=match):
        state.add(changed)
    assert state.count == 1 and all(torch.equal(v, before[k]) for k, v in state.state_dict().items())
    assert [p.name for p in (tmp_path / "state" / "generations").iterdir()] == ["000001"]


def test_num_batches_tracked_is_the_largest_seen_as_in_the_batch_merge(tmp_path):
    base = {"bn.weight": rand(4, seed=1), "bn.num_batches_tracked": torch.tensor(5)}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, steps in enumerate((40, 90, 70)):
        path = tmp_path / f"e{i}.safetensors"
        save_file({"bn.weight": base["bn.weight"] + rand(4, seed=10 + i) * 0.1,
                   "bn.num_batches_tracked": torch.tensor(steps)}, str(path))
        paths.append(path)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=Linear())
    for path in paths:
        state.add(path)
    batch = merge(paths, base=tmp_path / "base.safetensors", strategy=Linear())
    assert state.state_dict()["bn.num_batches_tracked"].item() == batch["bn.num_batches_tracked"].item() == 90


@pytest.mark.parametrize("strategy", [Linear(), TaskArithmetic(scale=0.7), OPCM(alpha=0.5)],
                         ids=["linear", "task_arithmetic", "opcm"])
def test_on_missing_base_gives_the_batch_merge_with_on_missing_base(tmp_path, strategy):
    base_path, paths = write_family(tmp_path, stats=False)
    headed = {k: Expert(paths[1]).tensor(k) for k in Expert(paths[1]).names()}
    headed["head.weight"] = torch.ones(2, 5)
    save_file(headed, str(tmp_path / "headed.safetensors"))
    lacking = {k: v for k, v in ((k, Expert(paths[2]).tensor(k)) for k in Expert(paths[2]).names())
               if k != "layer.0.bias"}
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    experts = [paths[0], tmp_path / "headed.safetensors", tmp_path / "lacking.safetensors"]
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=strategy, on_missing="base")
    for path in experts:
        state.add(path)
    batch = merge(experts, base=base_path, strategy=strategy, on_missing="base")
    folded = state.state_dict()
    assert folded.keys() == batch.keys() and "head.weight" not in folded
    for name, value in batch.items():
        torch.testing.assert_close(folded[name], value, rtol=1e-5, atol=1e-6)
    assert ContinualState(tmp_path / "state").describe()["on_missing"] == "base"
    with pytest.raises(ContinualError, match="another base, strategy or on_missing"):
        ContinualState.create(tmp_path / "state", base=base_path, strategy=strategy, exist_ok=True)
    with pytest.raises(ValueError, match="on_missing must be one of error, base"):
        ContinualState.create(tmp_path / "other", base=base_path, strategy=strategy, on_missing="union")


def test_on_missing_base_refuses_a_missing_tensor_where_statistics_weigh_it(tmp_path):
    base_path, paths = write_family(tmp_path)
    lacking = {k: Expert(paths[0]).tensor(k) for k in Expert(paths[0]).names() if k != "layer.0.bias"}
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    floats = ["layer.0.weight", "embed.weight"]
    write_statistics(tmp_path / "lacking.statistics.safetensors",
                     {"fisher.batch": {k: rand(*lacking[k].shape, seed=7).abs() + 0.05 for k in floats}},
                     {"fisher.batch": {"count": 5, "batch_size": 4}})
    state = ContinualState.create(tmp_path / "state", base=base_path, strategy=Fisher(), on_missing="base")
    with pytest.raises(ContinualError, match="lacks tensor 'layer.0.bias' .* weighs every tensor by the expert's "
                                             "statistics"):
        state.add(tmp_path / "lacking.safetensors")
    assert state.count == 0


def test_a_reader_sees_the_last_committed_state_at_every_step_of_an_add(tmp_path, monkeypatch):
    """Issue 27 #15, step by step: a reader that looks between the rename of the first generation and the commit
    sees an empty state (was: 'holds generations but no CURRENT pointer: it is damaged'); one whose generation is
    committed over and removed while it reads reads again (was: 'current generation is missing')."""
    base_path, paths = write_family(tmp_path, stats=False)
    folder = tmp_path / "state"
    ContinualState.create(folder, base=base_path, strategy=Linear())
    seen = []
    real_replace = os.replace

    def replace_and_look(src, dst):
        if str(dst).endswith("CURRENT"):  # just before the commit: what does a reader see?
            info = ContinualState(folder).describe()
            seen.append((info["count"], info["model"]))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_look)
    ContinualState(folder).add(paths[0])
    ContinualState(folder).add(paths[1])
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen == [(0, None), (1, str(folder / "generations" / "000001" / "model"))]

    reader = ContinualState(folder)
    real_pointer = ContinualState._pointer
    added = []

    def pointer_then_another_add(self):
        name = real_pointer(self)
        if self is reader and not added:  # between reading CURRENT and the generation it names, an add commits
            added.append(ContinualState(folder).add(paths[2]))
        return name

    monkeypatch.setattr(ContinualState, "_pointer", pointer_then_another_add)
    assert reader.count == 3 and [e["order"] for e in reader.journal] == [1, 2, 3]
    assert added[0]["order"] == 3


@pytest.mark.slow
def test_readers_never_see_damage_while_six_processes_add_to_a_new_state(tmp_path):
    """Issue 27 #15 as reported: six processes create (exist_ok) and add to a new state at once, four distinct
    experts and two duplicates, while this process reads it in a loop. Every read is a committed state (counts never
    go back), four experts are merged, both duplicates are refused, the model is the batch merge's. Bounded: each
    round waits at most 120 s."""
    base_path, paths = write_family(tmp_path, n=4, stats=False)
    code = ("import sys\nfrom lightning_merge import ContinualState, Linear\n"
            "from lightning_merge.continual.state import ContinualError\n"
            "state = ContinualState.create(sys.argv[1], base=sys.argv[2], strategy=Linear(), exist_ok=True)\n"
            "try:\n    state.add(sys.argv[3])\nexcept ContinualError as err:\n"
            "    print(err)\n    sys.exit(5 if 'already merged' in str(err) else 6)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    reads = 0
    for round_ in range(3):
        folder = tmp_path / f"state{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(base_path), str(p)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in paths + paths[:2]]
        counts = []
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the adds did not finish in 120 s"
            try:
                reader = ContinualState(folder)
            except FileNotFoundError:  # being created: no state.json yet
                continue
            info = reader.describe()
            counts.append(info["count"])
            assert len(info["journal"]) == info["count"]
            reads += 1
        codes = sorted(p.wait() for p in procs)
        assert codes == [0, 0, 0, 0, 5, 5], [p.communicate() for p in procs]
        assert counts == sorted(counts)
        state = ContinualState(folder)
        assert state.count == 4
        for name, value in merge(paths, base=base_path, strategy=Linear()).items():
            torch.testing.assert_close(state.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert reads > 0


def test_concurrent_creators_with_other_strategies_do_not_overwrite_each_other(tmp_path, monkeypatch):
    """Another process creates the state while this one reads the base to create it with another strategy: this
    creator is told (before, it silently replaced the other's state.json, and the other's adds then read running
    quantities of another strategy)."""
    from lightning_merge.continual import state as continual

    base_path, paths = write_family(tmp_path, stats=False)
    folder = tmp_path / "state"
    real = continual.as_expert
    meanwhile = []

    def as_expert_while_another_creates(obj, *args, **kwargs):
        if not meanwhile:
            meanwhile.append("creating")
            ContinualState.create(folder, base=base_path, strategy=OPCM()).add(paths[0])
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(continual, "as_expert", as_expert_while_another_creates)
    with pytest.raises(FileExistsError, match="already exists"):
        ContinualState.create(folder, base=base_path, strategy=Linear())
    with pytest.raises(ContinualError, match="exists with another base, strategy"):
        ContinualState.create(folder, base=base_path, strategy=Linear(), exist_ok=True)
    state = ContinualState(folder)
    assert state.strategy.name == "opcm" and state.count == 1


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(tensors=[]), "'tensors' is not an object of tensor names and shapes"),
    (lambda c: c.update(tensors={"layer.0.weight": "6,5"}), "'tensors' is not an object"),
    (lambda c: c.update(strategy="linear"), "'strategy' is a str, not an object"),
    (lambda c: c.update(base_fingerprint={}), "'base_fingerprint' does not give one fingerprint per tensor"),
    (lambda c: c.update(base=3), "'base' is not a path"),
    (lambda c: c.update(on_missing="union"), "'on_missing' is 'union'"),
], ids=["tensors-list", "shape-string", "strategy-string", "fingerprints-missing", "base-number", "on_missing-union"])
def test_a_damaged_state_json_is_one_clear_error(tmp_path, edit, match):
    state, base_path, paths = _state_with(tmp_path)
    config_path = tmp_path / "state" / "state.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ContinualError, match=match) as info:
        ContinualState(tmp_path / "state").add(paths[1])
    assert str(config_path) in str(info.value) and "damaged" in str(info.value)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(journal=["x"]), "journal is not a list of 1 entries"),
    (lambda m: m["journal"][0].pop("checksum"), "journal is not a list of 1 entries"),
    (lambda m: m.update(count="x"), "count is 'x', not a positive number"),
    (lambda m: m.pop("norms"), "'norms' is not a list of 1 numbers"),
    (lambda m: m.update(norms=[float("nan")]), "'norms' is not a list of 1 numbers"),
    (lambda m: m.update(count=2), "'norms' is not a list of 2 numbers"),
    (lambda m: m.clear(), "count is None"),
], ids=["journal-strings", "entry-without-checksum", "count-string", "no-norms", "nan-norm", "count-off",
        "emptied"])
def test_a_damaged_meta_json_is_one_clear_error(tmp_path, capsys, edit, match):
    from lightning_merge.cli.commands import main

    state, base_path, paths = _state_with(tmp_path)
    meta_path = state.current / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta, default=str))
    for action in (lambda: ContinualState(tmp_path / "state").describe(),
                   lambda: ContinualState(tmp_path / "state").add(paths[1])):
        with pytest.raises(ContinualError, match=match) as info:
            action()
        assert str(meta_path) in str(info.value) and "damaged" in str(info.value)
    assert main(["continual", "show", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json" in err[0]


@pytest.mark.parametrize("pointer", ["000001\0", "0" * 10_000, "current"])
def test_a_pointer_naming_anything_but_a_generation_is_refused(tmp_path, pointer):
    state, base_path, paths = _state_with(tmp_path)
    (tmp_path / "state" / "CURRENT").write_text(pointer)
    with pytest.raises(ContinualError, match="CURRENT' holds .*, not a generation name; the state is damaged") as info:
        ContinualState(tmp_path / "state").add(paths[1])
    assert len(str(info.value)) < 400
    assert (tmp_path / "state" / "generations" / "000001" / "meta.json").is_file()  # nothing removed


def test_a_retry_after_an_add_killed_past_its_commit_completes_it(tmp_path, capsys, monkeypatch):
    """Issue 27 #14 from the command line: the add committed, then its process stopped (simulated at the removal of
    the previous generation); `continual add` of the same expert exits 0 saying it completed the interrupted add,
    and the model is an uninterrupted run's; adding it once more is a duplicate."""
    from lightning_merge.cli.commands import main
    from lightning_merge.continual import state as continual

    state, base_path, paths = _state_with(tmp_path)
    real_rmtree = continual.shutil.rmtree

    def killed(path, *args, **kwargs):
        if str(path).endswith("000001"):
            raise KeyboardInterrupt  # the process stops right after the commit
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(continual.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        state.add(paths[1])
    monkeypatch.setattr(continual.shutil, "rmtree", real_rmtree)
    assert (tmp_path / "state" / "ADDING").is_file()
    capsys.readouterr()
    assert main(["continual", "add", str(tmp_path / "state"), str(paths[1])]) == 0
    assert "completed an interrupted add: " in capsys.readouterr().out
    state = ContinualState(tmp_path / "state")
    assert state.count == 2 and not (tmp_path / "state" / "ADDING").exists()
    assert sorted(p.name for p in (tmp_path / "state" / "generations").iterdir()) == ["000002"]
    for name, value in merge(paths[:2], base=base_path, strategy=Linear()).items():
        torch.testing.assert_close(state.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert main(["continual", "add", str(tmp_path / "state"), str(paths[1])]) == 2
    assert "already merged" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["CURRENT", "ADDING", ".lock"])
def test_a_folder_where_the_state_keeps_a_file_is_refused_and_kept(tmp_path, name):
    state, base_path, paths = _state_with(tmp_path)
    own = tmp_path / "state" / name
    if own.exists():
        own.unlink()
    own.mkdir()
    (own / "mine.txt").write_text("mine")
    with pytest.raises(ContinualError, match=f"'{own}' is a folder, not the state's file"):
        ContinualState(tmp_path / "state").add(paths[1])
    assert (own / "mine.txt").read_text() == "mine"


def test_hostile_state_files_are_clear_errors_and_a_damaged_marker_is_ignored(tmp_path):
    state, base_path, paths = _state_with(tmp_path)
    folder = tmp_path / "state"
    (folder / "ADDING").write_text("{not json")  # only ever describes an add that has not finished
    assert ContinualState(folder).add(paths[1])["order"] == 2 and not (folder / "ADDING").exists()

    config = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ContinualError, match="state.json' is not valid JSON"):
        ContinualState(folder)
    config["tensors"]["ghost"] = [2]  # a tensor the base does not have
    config["base_fingerprint"]["ghost"] = "0" * 16
    (folder / "state.json").write_text(json.dumps(config))
    with pytest.raises(ContinualError, match="changed since the state was created: .* \\(ghost\\)"):
        ContinualState(folder).add(paths[2])
    assert ContinualState(folder).count == 2


def test_files_saved_into_a_generation_are_never_deleted(tmp_path, caplog):
    """A user saves a tokenizer next to the merged model and an evaluation into the generation; the next add
    commits a new generation and leaves the old one, with a warning naming the files, instead of deleting them."""
    state, base_path, paths = _state_with(tmp_path)
    (state.model_path / "tokenizer.json").write_text("{}")
    (state.current / "eval.txt").write_text("accuracy 0.91")
    with caplog.at_level("WARNING", logger="lightning_merge"):
        state.add(paths[1])
        state.add(paths[2])  # the next add's cleanup keeps it too
    gens = tmp_path / "state" / "generations"
    assert sorted(p.name for p in gens.iterdir()) == ["000001", "000003"]
    assert (gens / "000001" / "eval.txt").read_text() == "accuracy 0.91"
    assert (gens / "000001" / "model" / "tokenizer.json").read_text() == "{}"
    assert "holds files the state did not write (eval.txt, model/tokenizer.json)" in caplog.text
    assert ContinualState(tmp_path / "state").count == 3


def test_a_base_inside_a_continual_state_is_refused(tmp_path):
    """The state refers to its base at every add; a base inside another state's generations would be deleted by
    that state's next add."""
    state, base_path, paths = _state_with(tmp_path)
    with pytest.raises(ContinualError, match="is inside the continual state .*state', whose generations are "
                                             "replaced"):
        ContinualState.create(tmp_path / "second", base=tmp_path / "state" / "current" / "model", strategy=Linear())
    assert not (tmp_path / "second").exists()


def test_continual_merge_refuses_a_module_with_a_tensor_the_base_lacks_before_training(tmp_path):
    """Issue 27 #11 through the callback: a module with a new head (a tensor the base lacks) was folded in with the
    head silently dropped; now setup refuses it before training, and on_missing='base' folds it in without it, as
    merge(..., on_missing='base') does."""
    from capture_helpers import Tiny, loader, trainer

    from lightning_merge.callbacks import ContinualMerge

    headless = {k: v.contiguous() for k, v in Tiny(lr=5e-2).state_dict().items() if not k.startswith("net.2.")}
    save_file(headless, str(tmp_path / "base.safetensors"))  # the base has no output layer: the module's is new
    callback = ContinualMerge(state=str(tmp_path / "state"), base=str(tmp_path / "base.safetensors"),
                              strategy=Linear())
    fit = trainer(tmp_path / "run0", [callback], max_epochs=1)
    with pytest.raises(ValueError, match="the module has tensor 'net.2.weight' \\(2 such\\) that the base .* lacks"):
        fit.fit(Tiny(lr=5e-2), loader(32, 8))
    assert fit.global_step == 0 and not (tmp_path / "state").exists()
    model = Tiny(lr=5e-2)
    callback = ContinualMerge(state=str(tmp_path / "state"), base=str(tmp_path / "base.safetensors"),
                              strategy=Linear(), on_missing="base")
    trainer(tmp_path / "run1", [callback], max_epochs=1).fit(model, loader(32, 8))
    merged = ContinualState(tmp_path / "state").state_dict()
    assert sorted(merged) == sorted(headless)
    for name in headless:
        torch.testing.assert_close(merged[name], model.state_dict()[name])
    with pytest.raises(ValueError, match="was created with on_missing='base', not 'error'"):
        ContinualMerge(state=str(tmp_path / "state"), on_missing="error").setup(
            trainer(tmp_path / "run2", []), Tiny(), "fit")


def test_continual_init_help_lists_every_strategy_with_a_continual_form():
    """`lightning-merge continual init --help` names each registered strategy whose default has a continual form
    (it lacked ram and iso_c)."""
    import argparse
    import re

    from lightning_merge.cli.commands import build_parser
    from lightning_merge.errors import NoContinualForm
    from lightning_merge.strategies import STRATEGIES

    def sub(parser, name):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    init = sub(sub(build_parser(), "continual"), "init")
    text = next(a.help for a in init._actions if "--strategy" in a.option_strings)
    listed = set(re.findall(r"[a-z_]+", text.split(":", 1)[1].split("(")[0]))
    forms = set()
    for name, cls in STRATEGIES.items():
        if not cls.__module__.startswith("lightning_merge."):
            continue  # registered by another test
        try:
            cls().continual_form()
        except NoContinualForm:
            continue
        forms.add(name)
    assert "ram" in forms and forms <= listed, forms - listed
