"""The on-disk format of a continual state: the names of its files, what ``state.json`` and a generation's
``meta.json`` hold (checked when read), and the journal's time stamps. The layout is described in
:mod:`lightning_merge.continual.store`, which reads and writes it."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any

from lightning_merge.errors import ContinualError

FORMAT = "lightning-merge/continual"
FORMAT_VERSION = 2
POINTER = "CURRENT"
#: written before an add renames its generation into place, removed when the add has finished: names the generation
#: being added and the expert's checksum, so a reader knows that generation is not committed yet and a retry of an add
#: killed after its commit can complete it.
MARKER = "ADDING"
#: the missing-tensor policies a state can record (as ``merge(..., on_missing=...)``): ``"error"`` refuses an expert
#: whose tensors are not exactly the base's; ``"base"`` keeps the base's tensors only (an expert's extra tensors are
#: left out, a base tensor the expert lacks counts as unchanged).
ON_MISSING = ("error", "base")
#: the names a state gives its generations (a bucket's have a unique suffix) and the folders an add writes into first
GENERATION = re.compile(r"\d{6}(?:-[0-9a-f]{8})?")
PARTIAL = re.compile(r"\.partial-\d+-[0-9a-f]{8}")
#: the state's own files and folders directly under its path (``current`` is a link the state writes)
OWN = ("state.json", POINTER, MARKER, "generations", ".lock")


def validate_config(where: Path, config: Any) -> None:
    """``state.json`` as the state wrote it, or a one-line error naming what is wrong (never a traceback later).

    Args:
        where: the file, for messages.
        config: its parsed content.

    Raises:
        ContinualError: naming the file and what is wrong.
    """
    def damaged(what: str) -> ContinualError:
        return ContinualError(f"'{where}': {what}; the state is damaged (restore state.json from a backup)")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ContinualError(f"'{where}' is not a lightning-merge continual state")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise damaged("format_version is not a number")
    if version > FORMAT_VERSION:
        raise ContinualError(f"'{where.parent}' was written by a newer lightning-merge; upgrade")
    for key in ("strategy", "base", "tensors", "base_fingerprint"):
        if key not in config:
            raise damaged(f"it has no {key!r}")
    if not isinstance(config["strategy"], dict):
        raise damaged(f"'strategy' is a {type(config['strategy']).__name__}, not an object")
    if not isinstance(config["base"], str) or not config["base"]:
        raise damaged("'base' is not a path")
    tensors, fingerprints = config["tensors"], config["base_fingerprint"]
    if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            for shape in tensors.values()):
        raise damaged("'tensors' is not an object of tensor names and shapes")
    if not isinstance(fingerprints, dict) or set(fingerprints) != set(tensors) or \
            not all(isinstance(v, str) for v in fingerprints.values()):
        raise damaged("'base_fingerprint' does not give one fingerprint per tensor")
    if config.get("on_missing", "error") not in ON_MISSING:
        raise damaged(f"'on_missing' is {config.get('on_missing')!r}, not one of {', '.join(ON_MISSING)}")


def parse_meta(where: Path, text: str) -> dict[str, Any]:
    """A generation's ``meta.json``, checked as the state wrote it (count, one norm, weight and journal entry per
    expert), or a one-line error naming the file.

    Args:
        where: the file, for messages.
        text: its content.

    Returns:
        The parsed metadata (``weights`` and ``totals`` filled in for a state written before they existed).

    Raises:
        ContinualError: naming the file and what is wrong.
    """
    def damaged(what: str) -> ContinualError:
        return ContinualError(f"'{where}': {what}; the state is damaged (restore the generation from a backup, or "
                              "start a new state)")

    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise damaged(f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise damaged(f"a {type(meta).__name__}, not an object")
    count = meta.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise damaged(f"count is {count!r}, not a positive number")
    meta.setdefault("weights", [1.0] * count)
    for key in ("norms", "weights"):
        values = meta.get(key)
        if not isinstance(values, list) or len(values) != count or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise damaged(f"{key!r} is not a list of {count} numbers")
    journal = meta.get("journal")
    if not isinstance(journal, list) or len(journal) != count or not all(
            isinstance(e, dict) and isinstance(e.get("order"), int)
            and all(isinstance(e.get(k), str) for k in ("name", "path", "checksum", "time")) for e in journal):
        raise damaged(f"its journal is not a list of {count} entries with order, name, path, checksum and time")
    if not isinstance(meta.setdefault("totals", {}), dict):
        raise damaged("'totals' is not an object")
    return meta


def now() -> str:
    """The current UTC time as the journal records it (ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
