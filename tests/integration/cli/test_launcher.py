"""Issue 27, item 12: ``lightning-merge merge`` in a launcher's environment (torchrun's WORLD_SIZE, RANK, MASTER_*)
checks the variables first, waits a bounded time for its peers, and otherwise says in one line which variables it
found and the two remedies. Before: gloo's 30-minute wait without a word, or a raw rendezvous error."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, one_line, recipe
from conftest import family as _family

from lightning_merge.cli.commands import main as cli
from lightning_merge.engine.distributed import join_launcher_group
from lightning_merge.files.safetensors import load_tensors

family = functools.partial(_family, stats=False)  # experts without sidecars

BAD_ENVIRONMENTS = [
    ("WORLD_SIZE and RANK without MASTER_ADDR", {"WORLD_SIZE": "2", "RANK": "1"},
     "variables found: WORLD_SIZE=2, RANK=1\\) but MASTER_ADDR, MASTER_PORT are not set.*--nproc 1"),
    ("RANK outside the world", {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK='2' is not a rank of a 2-process job"),
    ("WORLD_SIZE not a number", {"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a positive integer"),
    ("MASTER_PORT not a port", {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "MASTER_PORT='70000' is not a TCP port"),
]


@pytest.mark.parametrize("name,environ,match", BAD_ENVIRONMENTS, ids=[c[0] for c in BAD_ENVIRONMENTS])
def test_launcher_variables_are_checked_before_anything_waits(name, environ, match):
    started = time.monotonic()
    with pytest.raises(ValueError, match=match) as info:
        join_launcher_group(5.0, environ=environ)
    assert time.monotonic() - started < 1.0
    assert "torchrun --nproc-per-node N" in str(info.value) and "\n" not in str(info.value)


LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def launcher_env(monkeypatch):
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_the_command_line_names_the_variables_and_the_remedies(tmp_path, capsys, launcher_env):
    base, paths = family(tmp_path)
    launcher_env(WORLD_SIZE="2", RANK="0")
    assert cli(["merge", str(recipe(tmp_path, paths)), str(tmp_path / "out")]) == 2
    line = one_line(capsys)
    assert "WORLD_SIZE=2, RANK=0" in line and "MASTER_ADDR, MASTER_PORT are not set" in line
    assert "torchrun --nproc-per-node N" in line and "unset WORLD_SIZE and RANK, or pass --nproc 1" in line
    assert not (tmp_path / "out").exists()


def test_nproc_1_merges_in_one_process_whatever_the_launcher_variables(tmp_path, launcher_env):
    base, paths = family(tmp_path)
    r = str(recipe(tmp_path, paths))
    assert cli(["merge", r, str(tmp_path / "plain")]) == 0
    launcher_env(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # nothing listens there
    assert cli(["merge", r, str(tmp_path / "one"), "--nproc", "1"]) == 0
    assert load_tensors(tmp_path / "one" / "model.safetensors").keys() == {"w", "b"}
    for key, value in load_tensors(tmp_path / "plain" / "model.safetensors").items():
        assert torch.equal(load_tensors(tmp_path / "one" / "model.safetensors")[key], value)


def test_nproc_inside_a_launcher_job_is_refused(tmp_path, capsys, launcher_env):
    base, paths = family(tmp_path)
    launcher_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert cli(["merge", str(recipe(tmp_path, paths)), str(tmp_path / "out"), "--nproc", "2"]) == 2
    line = one_line(capsys)
    assert "--nproc 2 inside a 2-process job (WORLD_SIZE=2)" in line and "pass --nproc 1" in line


def test_a_single_process_environment_joins_nothing():
    assert join_launcher_group(1.0, environ={}) is False
    assert join_launcher_group(1.0, environ={"WORLD_SIZE": "1", "RANK": "0"}) is False
    with pytest.raises(ValueError, match="rendezvous timeout must be a positive number of seconds"):
        join_launcher_group(0.0, environ={"WORLD_SIZE": "2", "RANK": "0"})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_alone_is_told_in_seconds_not_after_gloo_s_30_minutes(tmp_path, rank):
    """Rank 0 waits for peers that never come; rank 1 for a server nobody starts: both answer within the
    rendezvous timeout, in one line naming the variables and the remedies (no C++ stack trace)."""
    base, paths = family(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env.update(WORLD_SIZE="2", RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=str(ROOT))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lightning_merge", "merge", str(recipe(tmp_path, paths)),
                           str(tmp_path / "out"), "--rendezvous-timeout", "2"], env=env, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert elapsed < 30, elapsed
    line = lines[0]
    assert f"rank {rank} of 2" in line and "within 2 s" in line
    assert f"WORLD_SIZE=2, RANK={rank}, MASTER_ADDR=127.0.0.1, MASTER_PORT=" in line
    assert "torchrun" in line and "pass --nproc 1" in line and "--rendezvous-timeout" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_started_by_hand_meet_and_merge(tmp_path):
    """The same variables torchrun sets, given by hand to two processes (rank 1 first: it waits for rank 0's
    server): they merge the one-process output."""
    base, paths = family(tmp_path)
    r = str(recipe(tmp_path, paths))
    assert cli(["merge", r, str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "lightning_merge", "merge", r, str(tmp_path / "two"), "--rendezvous-timeout", "60"]
    later = subprocess.Popen(command, env={**env, "RANK": "1"}, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    first = subprocess.run(command, env={**env, "RANK": "0"}, capture_output=True, text=True, timeout=120)
    assert later.wait(timeout=120) == 0, later.stderr.read()
    assert first.returncode == 0, first.stderr
    one = load_tensors(tmp_path / "one" / "model.safetensors")
    two = load_tensors(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_port_held_by_something_else_is_one_line(tmp_path, rank):
    """MASTER_PORT taken by another program: rank 0 cannot host the rendezvous, rank 1 reaches no store there
    (torch's client then logged a C++ stack trace at every attempt, before the error)."""
    import socket

    base, paths = family(tmp_path)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        env.update(WORLD_SIZE="2", RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(other.getsockname()[1]),
                   PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "lightning_merge", "merge", str(recipe(tmp_path, paths)),
                               str(tmp_path / "out"), "--rendezvous-timeout", "3"], env=env, capture_output=True,
                              text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    if rank == "0":  # it cannot listen there
        assert "rank 0 of 2: the rendezvous at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" in lines[0]
        assert "address already in use" in lines[0]
    else:  # the other program accepts the connection and never answers: torch's client waited forever
        assert "rank 1 of 2: the program listening at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" in lines[0]
        assert "never answered as a rendezvous store (another program holds MASTER_PORT?) within 3 s" in lines[0]
    assert "pass --nproc 1" in lines[0]
