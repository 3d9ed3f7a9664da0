"""Nothing is lost at any crash point.

A child process (forked from a clean forkserver, see tests/helpers/crash_child.py) runs a write (merge over an
existing output, a new single-file merge, a checkpoint average, a continual add) and SIGKILLs itself just before the
k-th call of every rename, exchange, delete, fsync and mkdir, for every k; other children are killed at random times.
After each kill the output must be whole, the old one or the new one, never half-written or missing; then a retry
must succeed and leave no temporary sibling behind (a continual add's retry succeeds at every kill point, the ones
after its commit included, and gives the uninterrupted run's model). The counts of kill points tried and outputs
lost are what the hardening note reports.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import crash_child
import pytest
import torch

import lightning_merge.files.atomic as lio
from lightning_merge import ContinualState, Expert, Linear, TaskArithmetic, merge
from lightning_merge.continual.state import ContinualError
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.tools.averaging import average_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

TALLY = {"tried": 0, "lost": 0}
CHILD_LIMIT = 120.0  # seconds one child write may take


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing forkserver with torch and lightning_merge imported: each write runs in a child forked from
    it (see tests/helpers/crash_child.py for why not from this process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lightning_merge", "crash_child"])
    return context


def _run_child(context, action: Callable[[], None], kill_at: int | None, delay: float | None = None,
               no_exchange: bool = False) -> tuple[int, int]:
    """Run ``action`` in a child, killed before its ``kill_at``-th hooked call (or after ``delay`` seconds).
    Returns ``(exit code, calls made)``: the exit code as ``Process.exitcode`` gives it (0, 3 for an exception,
    -9 for a kill); the calls come back through a pipe (-1 when the child did not finish)."""
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=crash_child.run, args=(action, kill_at, no_exchange, send), daemon=True)
    child.start()
    send.close()
    if delay is not None:
        child.join(delay)
        if child.exitcode is None:
            child.kill()
    child.join(CHILD_LIMIT)  # never wait forever: a stuck child fails the test instead of stalling the suite
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"a child write (kill_at={kill_at}) did not finish within {CHILD_LIMIT} s")
    try:
        calls = receive.recv() if receive.poll() else -1
    except EOFError:  # killed: its end of the pipe closed with nothing sent
        calls = -1
    receive.close()
    return child.exitcode, calls


def _family(root: Path, n: int = 3):
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(n):
        path = root / f"e{i}.safetensors"
        save_tensors(path, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        paths.append(path)
    return root / "base.safetensors", paths


def _read(path: Path) -> dict[str, torch.Tensor]:
    expert = Expert(path)
    return {k: expert.tensor(k) for k in expert.names()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _sweep(context, name: str, prepare: Callable[[], None], action: Callable[[], None], check: Callable[[], bool],
           finish: Callable[[], None], random_kills: int = 6, retry: Callable[[bool], None] | None = None,
           no_exchange: bool = False) -> None:
    """Kill ``action`` before each hooked call in turn, and at random times; after each, ``check`` must hold, and
    after the retry ``finish`` checks the result. ``retry(completed)`` is told whether the child finished before its
    kill (a random-time kill can come too late)."""
    prepare()
    status, total = _run_child(context, action, None, no_exchange=no_exchange)
    assert status == 0 and total > 0, f"{name}: the write did not succeed without a kill"
    start = time.perf_counter()
    prepare()
    _run_child(context, action, None, no_exchange=no_exchange)
    duration = time.perf_counter() - start
    rng = random.Random(0)
    plans = [(k, None) for k in range(1, total + 1)] + [(None, rng.uniform(0, duration)) for _ in range(random_kills)]
    for kill_at, delay in plans:
        prepare()
        status, _ = _run_child(context, action, kill_at, delay, no_exchange=no_exchange)
        TALLY["tried"] += 1
        if not check():
            TALLY["lost"] += 1
            pytest.fail(f"{name}: output lost or half-written after a kill at call {kill_at} / delay {delay}")
        completed = status == 0
        try:
            retry(completed) if retry is not None else action()  # the retry, in this process
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"{name}: the retry after a kill at call {kill_at} / delay {delay} failed: {err}")
        finish()


def test_merge_over_an_existing_output_survives_every_kill(tmp_path, forkserver, no_exchange=False):
    base, paths = _family(tmp_path)
    out = tmp_path / "merged"
    old = merge(paths[:2], base, Linear())
    new = merge(paths, base, TaskArithmetic(scale=0.5))

    def prepare():
        for p in tmp_path.iterdir():
            if p.name.startswith((".merged", "merged")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        merge(paths[:2], base, Linear(), out=out)

    action = functools.partial(merge, paths, base, TaskArithmetic(scale=0.5), out=out, overwrite=True)

    def check():  # after a kill: the old output or the new one, whole (the next writer restores a moved-aside one)
        lio.cleanup_stale(out)
        return out.is_dir() and (_same(_read(out), old) or _same(_read(out), new))

    def finish():
        assert _same(_read(out), new) and _siblings(out) == []

    _sweep(forkserver, "merge --overwrite", prepare, action, check, finish, no_exchange=no_exchange)


def test_the_fallback_without_an_atomic_exchange_survives_every_kill(tmp_path, forkserver, monkeypatch):
    monkeypatch.setattr(lio, "_exchange", lambda a, b: False)  # filesystems without renameat2 (the retries here)
    test_merge_over_an_existing_output_survives_every_kill(tmp_path, forkserver, no_exchange=True)  # and children


def test_a_new_single_file_merge_survives_every_kill(tmp_path, forkserver):
    base, paths = _family(tmp_path)
    out = tmp_path / "merged.safetensors"
    new = merge(paths, base, Linear())

    def prepare():
        for p in tmp_path.iterdir():
            if p.name.startswith((".merged", "merged")):
                p.unlink()

    action = functools.partial(merge, paths, base, Linear(), out=out, overwrite=True)

    def check():
        return not out.exists() or _same(_read(out), new)

    def finish():
        assert _same(_read(out), new) and _siblings(out) == []

    _sweep(forkserver, "merge to a file", prepare, action, check, finish)


def test_a_new_output_without_overwrite_survives_every_kill(tmp_path, forkserver):
    """The no-overwrite commit (renameat2 RENAME_NOREPLACE) leaves nothing, or the whole new output."""
    base, paths = _family(tmp_path)
    out = tmp_path / "merged"
    new = merge(paths, base, Linear())

    def prepare():
        for p in tmp_path.iterdir():
            if p.name.startswith((".merged", "merged")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    action = functools.partial(merge, paths, base, Linear(), out=out)

    def check():
        lio.cleanup_stale(out)
        return not out.exists() or _same(_read(out), new)

    def retry(completed: bool):
        if not out.exists():
            action()

    def finish():
        assert _same(_read(out), new) and _siblings(out) == []

    _sweep(forkserver, "merge to a new folder", prepare, action, check, finish, retry=retry)


def test_an_average_over_an_existing_checkpoint_survives_every_kill(tmp_path, forkserver):
    ckpts = []
    for i in range(3):
        path = tmp_path / f"c{i}.ckpt"
        torch.save({"state_dict": {"w": torch.full((32, 32), float(i))}, "global_step": i}, path)
        ckpts.append(path)
    out = tmp_path / "avg.ckpt"

    def prepare():
        for p in tmp_path.iterdir():
            if p.name.startswith((".avg", "avg")):
                p.unlink()
        # an earlier average (its lightning_merge key marks it): --overwrite replaces only the tool's own outputs
        torch.save({"state_dict": {"w": torch.zeros(32, 32)}, "global_step": 0, "lightning_merge": {}}, out)

    action = functools.partial(average_checkpoints, ckpts, out, overwrite=True)

    def check():
        w = torch.load(out, weights_only=True)["state_dict"]["w"]
        return torch.equal(w, torch.zeros(32, 32)) or torch.equal(w, torch.ones(32, 32))

    def finish():
        assert torch.equal(torch.load(out, weights_only=True)["state_dict"]["w"], torch.ones(32, 32))
        assert _siblings(out) == []

    _sweep(forkserver, "average", prepare, action, check, finish)


@pytest.mark.parametrize("strategy", [TaskArithmetic()], ids=["task_arithmetic"])
def test_a_continual_add_survives_every_kill(tmp_path, forkserver, strategy):
    """At every kill point the state is the old one or the new one, whole; a retry of the same add then succeeds
    (after a kill past the commit it completes the interrupted add, saying so, and folds nothing in twice) and the
    state is the uninterrupted run's, to the bit."""
    base, paths = _family(tmp_path)
    folder = tmp_path / "state"
    one = merge(paths[:1], base, strategy)
    two = merge(paths[:2], base, strategy)
    outcomes = {"added": 0, "completed": 0, "duplicate": 0}

    def prepare():
        shutil.rmtree(folder, ignore_errors=True)
        ContinualState.create(folder, base=base, strategy=strategy).add(paths[0])

    action = functools.partial(crash_child.continual_add, folder, paths[1])

    prepare()
    action()
    uninterrupted = ContinualState(folder).state_dict()
    journal = ContinualState(folder).journal

    def check():
        state = ContinualState(folder)
        got = state.state_dict()
        return (state.count == 1 and _close(got, one)) or (state.count == 2 and _close(got, two))

    def retry(completed):
        state = ContinualState(folder)
        # the add finished before the kill when the child exited, or when it was killed after its last step (the
        # ADDING marker removed: what remains of add() is returning); the same add again is then a duplicate
        completed = completed or (state.count == 2 and not (folder / "ADDING").exists())
        if completed:
            with pytest.raises(ContinualError, match="already merged"):
                state.add(paths[1])
            outcomes["duplicate"] += 1
            return
        entry = state.add(paths[1])  # the same add, after a kill at any point: it succeeds
        assert entry["order"] == 2 and entry["checksum"] == journal[1]["checksum"]
        outcomes["completed" if entry.get("completed_interrupted_add") else "added"] += 1

    def finish():
        state = ContinualState(folder)
        assert state.count == 2 and _same(state.state_dict(), uninterrupted)
        assert [(e["order"], e["checksum"]) for e in state.journal] == [(e["order"], e["checksum"]) for e in journal]
        assert [p.name for p in (folder / "generations").iterdir()] == ["000002"]
        assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]
        assert not (folder / "ADDING").exists()

    _sweep(forkserver, "continual add", prepare, action, check, finish, retry=retry)
    print(f"\ncontinual add: retried after {outcomes['added']} kills before the commit, completed "
          f"{outcomes['completed']} interrupted adds, refused {outcomes['duplicate']} repeats of a finished add")
    assert outcomes["completed"] >= 3  # the kills between the commit and the end of the add


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_a_copied_state_keeps_working(tmp_path):
    base, paths = _family(tmp_path)
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear())
    state.add(paths[0])
    state.add(paths[1])
    shutil.copytree(tmp_path / "state", tmp_path / "copy")  # the `current` link becomes a folder
    copy = ContinualState(tmp_path / "copy")
    assert copy.count == 2
    copy.add(paths[2])
    assert copy.count == 3 and len(list((tmp_path / "copy" / "generations").iterdir())) == 1
    assert _close(copy.state_dict(), merge(paths, base, Linear()))
    assert (tmp_path / "copy" / "current").is_symlink()


def test_the_tally_reported_in_the_note():
    """Run after the sweeps above (same module): every kill point was tried and nothing was lost."""
    if TALLY["tried"]:
        print(f"\nkill points tried: {TALLY['tried']}, outputs lost: {TALLY['lost']}")
        assert TALLY["lost"] == 0
