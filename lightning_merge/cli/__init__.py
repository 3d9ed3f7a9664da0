"""The ``lightning-merge`` command (:mod:`.main`) and its demo (:mod:`.demo`)."""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None) -> int:
    """Run the ``lightning-merge`` command line (the console script's entry point)."""
    from lightning_merge.cli.main import main as run

    return run(argv)


def __getattr__(name: str) -> Any:
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.cli.main", name)
