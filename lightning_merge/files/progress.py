"""Progress of long passes, counted in bytes: a tqdm bar on a terminal (or when asked), silent otherwise.

Every pass over a model reports through :func:`bar`: the merge itself, the first passes of strategies that need one
(model-wide Fisher norms, top-k thresholds, LiNeS' α, OPCM's norms), continual adds, adapter outputs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """A byte-counting bar (``enabled=None``: only when stderr is a terminal)."""

    def __init__(self, desc: str, total: int, enabled: bool | None = None):
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                         leave=False, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], sizes: Iterable[int], desc: str, enabled: bool | None = None) -> Iterator[T]:
    """Iterate ``items``, advancing a bar by each one's size in bytes."""
    items, sizes = list(items), list(sizes)
    with Progress(desc, sum(sizes), enabled) as progress:
        for item, size in zip(items, sizes):
            yield item
            progress.update(size)


__all__ = ["Progress", "track"]
