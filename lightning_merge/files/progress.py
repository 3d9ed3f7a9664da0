"""Progress of long passes, counted in bytes: a tqdm bar on a terminal (or when asked); in a job's log (stderr not a
terminal), a plain line every ``LOG_EVERY`` seconds once a pass has run that long, so a merge or continual add of
minutes is never silent there, while short ones print nothing.

Every pass over a model reports through :class:`Progress`: the merge itself, the first passes of strategies that need
one (model-wide Fisher norms, top-k thresholds, LiNeS' α, OPCM's norms), continual adds, adapter outputs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from lightning_merge.files.text import byte_size

T = TypeVar("T")

#: seconds between two progress lines in a log (the first comes after a pass has run this long)
LOG_EVERY = 10.0


#: the units of a log line (binary: a MiB is 1024 KiB)
UNITS = ("B", "KiB", "MiB", "GiB")


class Progress:
    """A byte-counting progress report.

    Args:
        desc: what the pass does (``"merging"``), the line's first word.
        total: the bytes the pass will go through.
        enabled: True for a tqdm bar, False for nothing; None (default): a bar when stderr is a terminal, else a
            plain line to stderr every ``every`` seconds once the pass has run that long.
        every: seconds between two lines in a log.
        stream: where log lines go (default ``sys.stderr``).
    """

    def __init__(self, desc: str, total: int, enabled: bool | None = None, *, every: float = LOG_EVERY,
                 stream: TextIO | None = None):
        from tqdm.auto import tqdm

        terminal = sys.stderr.isatty()
        show = terminal if enabled is None else enabled
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                         leave=False, dynamic_ncols=True)
        self._log = enabled is None and not terminal
        self._desc, self._total, self._every, self._stream = desc, total, every, stream
        self._done = 0
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()  # passes update from worker threads
        self.lines = 0

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)
        if not self._log:
            return
        with self._lock:
            self._done += nbytes
            now = time.monotonic()
            if now - self._last < self._every:
                return
            self._last = now
            share = f" ({100 * self._done / self._total:.0f}%)" if self._total > 0 else ""
            done, total = byte_size(self._done, UNITS), byte_size(self._total, UNITS)
            line = f"lightning-merge: {self._desc}: {done} of {total}{share}, {now - self._start:.0f} s"
            print(line, file=self._stream or sys.stderr, flush=True)
            self.lines += 1

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], sizes: Iterable[int], desc: str, enabled: bool | None = None) -> Iterator[T]:
    """Iterate ``items``, advancing a report by each one's size in bytes."""
    items, sizes = list(items), list(sizes)
    with Progress(desc, sum(sizes), enabled) as progress:
        for item, size in zip(items, sizes):
            yield item
            progress.update(size)


__all__ = ["LOG_EVERY", "Progress", "track"]
