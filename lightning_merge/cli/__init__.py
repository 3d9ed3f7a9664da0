"""The ``lightning-merge`` command (:mod:`.commands`, whose :func:`main` is the console script's entry point,
``lightning_merge.cli:main``) and its demo (:mod:`.demo`)."""

from __future__ import annotations

from typing import Any

from lightning_merge.cli.commands import main


def __getattr__(name: str) -> Any:
    from lightning_merge.moved import forward

    return forward(__name__, "lightning_merge.cli.commands", name)


__all__ = ["main"]
