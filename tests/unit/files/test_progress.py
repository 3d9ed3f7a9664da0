"""Long passes report in a job's log (stderr not a terminal) every few seconds; short ones print nothing (issue 30)."""

from __future__ import annotations

import io

from lightning_merge.files import progress as progress_module
from lightning_merge.files.progress import Progress


def test_a_log_gets_a_line_every_period_with_bytes_share_and_time(monkeypatch):
    clock = iter([0.0, 4.0, 11.0, 15.0, 23.0])  # the start, then one reading per update
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    with Progress("merging", 4 << 20, None, every=10.0, stream=stream) as bar:
        for _ in range(4):  # at 4 s (too soon), 11 s, 15 s (too soon), 23 s
            bar.update(1 << 20)
    lines = stream.getvalue().splitlines()
    assert lines == ["lightning-merge: merging: 2.0 MiB of 4.0 MiB (50%), 11 s",
                     "lightning-merge: merging: 4.0 MiB of 4.0 MiB (100%), 23 s"]
    assert bar.lines == 2


def test_a_short_pass_or_an_explicit_choice_prints_nothing(monkeypatch):
    stream = io.StringIO()
    with Progress("merging", 100, None, every=10.0, stream=stream) as bar:
        bar.update(100)  # well under ten seconds
    with Progress("merging", 100, False, every=0.0, stream=stream) as bar:
        bar.update(100)  # progress=False: silent, whatever the time
    assert stream.getvalue() == ""
