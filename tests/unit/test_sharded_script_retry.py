"""The test suite's retry of a sharded-fit script that gloo aborts at exit (conftest.run_sharded_script)."""

from __future__ import annotations

import sys

from conftest import GLOO_EXIT_ABORT, run_sharded_script

SCRIPT = f"""
import os, sys
from pathlib import Path
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
runs = Path(sys.argv[2])
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
(out / f"run{{len(runs.read_text())}}.txt").write_text("written")
if len(runs.read_text()) <= int(sys.argv[3]):
    sys.stderr.write({GLOO_EXIT_ABORT!r} + "\\n"); sys.stderr.flush()
    os.abort()
"""


def test_an_exit_abort_is_run_once_more_on_an_emptied_output(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = run_sharded_script([sys.executable, "-c", SCRIPT, str(out), str(runs), "1"], out)
    assert done.returncode == 0 and runs.read_text() == "xx"
    assert [p.name for p in out.iterdir()] == ["run2.txt"]  # the aborted run's file is gone


def test_a_second_abort_or_another_failure_is_returned_as_it_is(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = run_sharded_script([sys.executable, "-c", SCRIPT, str(out), str(runs), "5"], out)
    assert done.returncode == -6 and runs.read_text() == "xx"  # two runs, not more
    failing = run_sharded_script([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "none")
    assert failing.returncode == 3
