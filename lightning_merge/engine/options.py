"""The options of a merge, checked once where a merge is asked for (:class:`MergeOptions`): the accepted values, the
output dtype's names, the one include/exclude rule (:func:`selects`), and what a strategy declares about its inputs
(:func:`check_strategy`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_merge.sources.expert import Expert
from lightning_merge.strategies.base import Strategy

ON_MISSING = ("error", "union", "intersection", "base")
ON_MISSING_STATISTIC = ("error", "uniform")
OUTPUTS = (None, "peft")
UNMERGED_FROM = ("base", "first")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``torch.bfloat16``... → a floating torch dtype (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{what} {dtype} is not a floating dtype; use one of {', '.join(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"{what} {dtype!r} is not a floating dtype; use one of {', '.join(DTYPES)}") from None



def parse_size(size: int | str, what: str = "shard size") -> int:
    """``"5GB"``, ``"500MB"`` or a number of bytes (units are binary: 1MB = 2²⁰ bytes).

    Args:
        size: the size.
        what: the argument's name, for messages.

    Raises:
        ValueError: naming the argument, the value and the accepted units.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"{what} must be positive, got {size}")
        return size
    text = str(size).strip().upper().replace("IB", "B")
    units = (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1))
    unit, factor = next(((u, f) for u, f in units if text.endswith(u)), ("", 1))
    number = text[: len(text) - len(unit)].strip()
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"{what} {size!r} is not a size: use a number of bytes or e.g. 500MB, 5GB") from None
    if value <= 0:
        raise ValueError(f"{what} {size!r} must be positive")
    return value


def patterns(value: Sequence[str] | str | None, option: str = "include") -> tuple[str, ...] | None:
    """``include=`` / ``exclude=`` as a tuple of glob patterns: one pattern (a string) or several; None stays None.

    Raises:
        TypeError: a pattern that is not a string, naming ``option``.
    """
    if value is None:
        return None
    found = (value,) if isinstance(value, str) else tuple(value)
    for pattern in found:
        if not isinstance(pattern, str):
            raise TypeError(f"{option} patterns must be strings (shell globs over tensor names), got {pattern!r}")
    return found


def selects(name: str, include: Sequence[str] | str | None, exclude: Sequence[str] | str | None) -> bool:
    """Whether tensor ``name`` is merged under ``include`` and ``exclude`` (shell globs over whole names): the one
    rule of every merge path (:func:`~lightning_merge.merge`, checkpoint averaging, the merge callbacks).

    ``include=None`` selects every tensor; otherwise only the names matching one of its patterns, so an empty
    ``include`` (``[]``) selects none (and a merge refuses it: nothing would be merged). ``exclude`` then removes
    the names matching one of its patterns (``None`` or ``[]``: none).
    """
    include, exclude = patterns(include, "include"), patterns(exclude, "exclude")
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude or ())


@dataclass(frozen=True)
class MergeOptions:
    """How a merge runs, checked once when made (see :func:`~lightning_merge.merge` for each option's meaning).

    Every field is validated and normalised in the constructor: ``include``/``exclude`` become tuples of patterns,
    ``dtype`` a torch dtype, ``shard_size`` a number of bytes. A bad value raises :class:`ValueError` (or
    :class:`TypeError`) naming the argument.

    Attributes:
        include: glob patterns of the tensors to merge (None: all).
        exclude: glob patterns of the tensors copied instead of merged.
        dtype: the output dtype of floating tensors (None: each tensor's own).
        on_missing: tensors some experts lack: one of :data:`ON_MISSING`.
        on_missing_statistic: an expert without a required statistic: one of :data:`ON_MISSING_STATISTIC`.
        output: None (full weights) or ``"peft"`` (a LoRA adapter).
        rank: the adapter's rank with ``output="peft"`` (None: exact).
        shard_size: the largest safetensors shard, in bytes.
        overwrite: replace an earlier output of lightning-merge.
        threads: worker threads over tensors (None: the default).
        memory_budget: the bytes the tensor jobs running at once may hold (inputs, float32 copies, a strategy's
            temporaries, the output; see :mod:`lightning_merge.engine.schedule`), or None for the default
            (:data:`~lightning_merge.engine.schedule.DEFAULT_MEMORY_BUDGET`, 192 MiB); ``"1GB"``-style strings
            are accepted.
        progress: show a progress bar (None: when stderr is a terminal).
        unmerged_from: where a tensor left out of the merge by ``include``/``exclude`` comes from: ``"base"`` (or the
            first expert holding it when the base lacks it) or ``"first"`` (the first expert holding it).
        files: what a folder output writes besides the weights, after the base's support files: file name → its
            text or bytes, (a ``.json`` file) a mapping of keys set in the copied file, or None to leave the base's
            copy out (see :func:`check_files`).
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    dtype: torch.dtype | None = None
    on_missing: str = "error"
    on_missing_statistic: str = "error"
    output: str | None = None
    rank: int | None = None
    shard_size: int = 5 << 30
    overwrite: bool = False
    threads: int | None = None
    progress: bool | None = None
    unmerged_from: str = "base"
    memory_budget: int | None = None
    files: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if self.on_missing_statistic not in ON_MISSING_STATISTIC:
            raise ValueError(f"on_missing_statistic must be one of {', '.join(ON_MISSING_STATISTIC)}, got "
                             f"{self.on_missing_statistic!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be None or 'peft', got {self.output!r}")
        if self.unmerged_from not in UNMERGED_FROM:
            raise ValueError(f"unmerged_from must be 'base' or 'first', got {self.unmerged_from!r}")
        if self.on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)}, got {self.on_missing!r}")
        set_ = object.__setattr__  # normalised once, here: the dataclass is frozen
        set_(self, "include", patterns(self.include, "include"))
        set_(self, "exclude", patterns(self.exclude, "exclude"))
        set_(self, "dtype", parse_dtype(self.dtype))
        set_(self, "shard_size", parse_size(self.shard_size))
        set_(self, "files", check_files(self.files))
        threads = self.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        if self.memory_budget is not None:
            set_(self, "memory_budget", parse_size(self.memory_budget, "memory_budget"))
        if self.output != "peft" and self.rank is not None:
            raise ValueError("rank= applies to output='peft' only (the rank of the adapter written)")

    @property
    def plan_dtype(self) -> torch.dtype | None:
        """The dtype the tensor jobs produce: float32 for an adapter (factored after), else :attr:`dtype`."""
        return torch.float32 if self.output == "peft" else self.dtype

    def replace(self, **changes: Any) -> MergeOptions:
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)


def check_files(files: Any) -> tuple[tuple[str, Any], ...] | None:
    """``files=`` of a merge as a tuple of ``(name, content)``: a plain file name (no folder), its content (text or
    bytes), for a ``.json`` file a mapping of the keys to set in the file the base brought (created if none; a
    mapping under a key the file holds as an object sets that object's keys), or None to leave out the base's copy
    of that file.

    Raises:
        ValueError: a name with a folder or a weight suffix, or content of the wrong type.
    """
    if files is None:
        return None
    items = tuple(files.items()) if isinstance(files, dict) else tuple(tuple(item) for item in files)
    for name, content in items:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or \
                name.endswith((".safetensors", ".bin", ".pt", ".ckpt")) or name == "lightning_merge.json":
            raise ValueError(f"files: {name!r} is not a file name a merge may add (a plain name, not weights, not "
                             "lightning_merge.json)")
        if content is not None and not isinstance(content, (str, bytes)) and \
                not (isinstance(content, dict) and name.endswith(".json")):
            raise ValueError(f"files: {name!r} must be text or bytes (or, for a .json file, a mapping of keys to "
                             f"set; None leaves the base's copy out), got {type(content).__name__}")
    return items


def check_strategy(strategy: Strategy, experts: Sequence[Expert], base: Expert | None) -> None:
    """What a strategy declares about its inputs, checked in one place for every merge path: a base when it
    ``needs_base``, and a number of experts it accepts.

    Raises:
        ValueError: naming the strategy and what to pass.
    """
    if strategy.needs_base and base is None:
        raise ValueError(f"strategy {strategy.name!r} needs a base model (base=...); Linear does not")
    strategy.check_num_experts(len(experts))


__all__ = [
    "DTYPES",
    "ON_MISSING",
    "ON_MISSING_STATISTIC",
    "OUTPUTS",
    "MergeOptions",
    "check_files",
    "check_strategy",
    "parse_dtype",
    "parse_size",
    "patterns",
    "selects",
]
