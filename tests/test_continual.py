"""OPCM (sanity properties, the projection against its full-SVD definition) and the continual state: folding
experts one at a time equals merging them at once, journal, duplicates, other bases, crashes, concurrency, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
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
from lightning_merge.continual import ContinualError
from lightning_merge.stats import write_statistics
from lightning_merge.strategies.opcm import opcm_project


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_family(tmp_path, n=4, stats=True):
    base = {
        "layer.0.weight": rand(6, 5, seed=1),
        "layer.0.bias": rand(6, seed=2),
        "embed.weight": rand(7, 5, seed=3),
        "steps": torch.tensor([3]),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(n):
        expert = {
            k: (v + 0.3 * rand(*v.shape, seed=10 * i + j) if v.is_floating_point() else v)
            for j, (k, v) in enumerate(base.items())
        }
        path = tmp_path / f"e{i}.safetensors"
        save_file(expert, str(path))
        if stats:
            floats = [k for k in base if base[k].is_floating_point()]
            write_statistics(
                tmp_path / f"e{i}.statistics.safetensors",
                {
                    "fisher.batch": {
                        k: rand(*base[k].shape, seed=100 + 10 * i + j).abs() + 0.05 for j, k in enumerate(floats)
                    },
                    "exp_avg_sq": {
                        k: rand(*base[k].shape, seed=200 + 10 * i + j).abs() + 0.05 for j, k in enumerate(floats)
                    },
                },
                {"fisher.batch": {"count": 5, "batch_size": 4}, "exp_avg_sq": {"beta2": 0.999, "step": 100}},
            )
        paths.append(path)
    return tmp_path / "base.safetensors", paths


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


def test_opcm_device_choice(tmp_path):
    """OPCM(device=...): a bad name is refused at construction, "cuda" without a GPU is refused when the merge
    resolves it (naming the argument and the remedy), and the SVDs on an explicit device give the default's
    model: on the CPU exactly; on a GPU, when this machine has one, within float32 SVD noise."""
    from lightning_merge.strategies.opcm import opcm_device

    with pytest.raises(ValueError, match="OPCM.device must be"):
        OPCM(device="not-a-device")
    assert opcm_device("cpu") == torch.device("cpu")
    assert opcm_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    with pytest.raises(ContinualError, match="lacks 3 tensor"):
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
    from lightning_merge.cli import main

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


def _tiny_base(tmp_path):
    from capture_helpers import Tiny

    base = tmp_path / "tiny-base.safetensors"
    save_file({k: v.contiguous() for k, v in Tiny(lr=5e-2).state_dict().items()}, str(base))
    return base


def test_continual_merge_callback_folds_each_run(tmp_path):
    from capture_helpers import Tiny, loader, trainer

    from lightning_merge.callbacks import ContinualMerge, CurvatureCapture

    base = _tiny_base(tmp_path)
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


def test_continual_merge_under_ddp(tmp_path):
    from capture_helpers import Tiny, ddp_loader, trainer

    from lightning_merge.callbacks import ContinualMerge

    base = _tiny_base(tmp_path)
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

    from lightning_merge.continual import parallel_map

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
