"""Values in messages: a value read from a user's file (a YAML recipe whose aliases expand a short text into a
huge nested list, a JSON config) is shown by a bounded ``repr``, never by one the size of the value."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40


def brief(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut short: at most a few items per level, three levels, and ``limit`` characters (the
    work is bounded too: a deeply nested value is not expanded to be cut)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def byte_size(n: float, units: tuple[str, ...] = ("B", "KB", "MB", "GB", "TB")) -> str:
    """``n`` bytes in the largest of ``units`` (each 1024 times the one before) under which it stays below 1024,
    the last unit however large: ``"512 B"``, ``"1.5 KB"``."""
    for unit in units:
        if abs(n) < 1024 or unit == units[-1]:
            return f"{int(n)} {unit}" if unit == units[0] else f"{n:.1f} {unit}"
        n /= 1024
    raise ValueError("byte_size needs at least one unit")


__all__ = ["brief", "byte_size"]
