"""Validation of strategy arguments: each check raises a ``ValueError`` that names the argument as
``Owner.field`` and says what is expected.

``owner`` is the class whose argument is checked (``type(self)`` in ``__post_init__``: its name is used, so a
subclass is named as itself), or a string for another caller (``"average_checkpoints"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from lightning_merge.files.text import brief

PerExpert = float | list[float] | None
Owner = type | str


def owner_name(owner: Owner) -> str:
    """The name an error message gives ``owner``: a class's name, or the string itself."""
    return owner if isinstance(owner, str) else owner.__name__


def check_number(owner: Owner, field: str, value: Any, *, low: float | None = None, high: float | None = None,
                 per_expert: bool = False, finite: bool = True) -> None:
    """Validate a number (or a list of numbers when ``per_expert``) against an inclusive range."""
    who = owner_name(owner)
    values = value if per_expert and isinstance(value, (list, tuple)) else [value]
    if per_expert and isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{who}.{field} is an empty list; give a number or one value per expert")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = "a number or a list of numbers" if per_expert else "a number"
            raise ValueError(f"{who}.{field} must be {kind}, got {brief(value)}")
        if finite and not math.isfinite(v):
            raise ValueError(f"{who}.{field} must be finite, got {v!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ValueError(f"{who}.{field} must be in [{lo}, {hi}], got {v!r}")


#: normalising by Σw is refused when |Σw| is at most this fraction of Σ|w| (weights that cancel)
CANCELLING = 1e-6


def normalizing_sum(owner: Owner, weights: Sequence[float], what: str = "weights") -> float:
    """Σw, the sum a normalised weighted average divides by: refused when it is 0, or negligible next to Σ|w|
    (weights that cancel, such as 1 and −1, or 0.1, 0.2 and −0.3, whose float sum is 6e-17), where the "average" would
    be undefined or its task vectors amplified a million times.

    Raises:
        ValueError: naming ``owner.what``, the weights and their sum, and what to do.
    """
    total = math.fsum(weights)
    if abs(total) <= CANCELLING * math.fsum(abs(w) for w in weights):
        listed = ", ".join(f"{w:g}" for w in weights)
        raise ValueError(
            f"{owner_name(owner)}.{what} [{listed}] sum to {total:g}: normalize=True divides by their sum, so the "
            "weighted average is undefined; give weights with a non-zero sum (e.g. positive ones), or normalize=False "
            "for the plain weighted sum"
        )
    return total


def check_precision_weights(owner: Owner, weights: PerExpert) -> None:
    """λᵢ of a precision-weighted mean (Fisher, OTA, ``weighting=``, the weighted median): numbers ≥ 0 (a negative
    weight makes Σ λᵢPᵢ vanish or change sign, and the quotient meaningless) and not all 0 (no expert would weigh
    anything: the merge would be the base). None (every λᵢ = 1) passes."""
    if weights is None:
        return
    check_number(owner, "weights", weights, per_expert=True, low=0)
    values = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    if not any(values):
        raise ValueError(f"{owner_name(owner)}.weights are all 0: no expert would have any weight in the merge; give "
                         "a positive weight to at least one expert")


def check_weights_so_far(strategy: Any, index: int) -> None:
    """In a continual state, the model after adding expert ``index`` is the precision-weighted mean of experts
    0..index: refused before any work when their weights are all 0 (it would be the base). ``strategy`` is the
    :class:`~lightning_merge.strategies.Strategy` being folded."""
    if not any(strategy.per_expert("weights", i, 1.0) for i in range(index + 1)):
        raise ValueError(
            f"{type(strategy).__name__}.weights of the experts added so far, this one included, are all 0: the "
            "continual model would be the base; give this expert a positive weight"
        )


def check_choice(owner: Owner, field: str, value: Any, choices: Sequence[Any]) -> None:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner_name(owner)}.{field} must be one of {', '.join(map(repr, choices))}; got "
                         f"{brief(value)}")


def check_bool(owner: Owner, field: str, value: Any) -> None:
    """Validate a flag: ``True`` or ``False`` only (``1`` or ``"yes"`` are refused, though ``1 == True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner_name(owner)}.{field} must be True or False, got {brief(value)}")


def check_int(owner: Owner, field: str, value: Any, *, low: int | None = None) -> None:
    """Validate an integer (not a bool), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{owner_name(owner)}.{field} must be an integer{bound}, got {brief(value)}")


def check_pattern(owner: Owner, field: str, value: Any, *, optional: bool = True) -> None:
    """Validate a regular expression (or None, when ``optional``): ``not_svd``, ``not_linear``.

    An empty pattern, or one with an empty top-level alternative (``"lm_head|"``), is found in every tensor name, so
    it names every tensor: never what a list of exceptions or a kind of tensor means, and refused. (Other patterns
    that match the empty string, such as a negative lookahead ``"^(?!.*encoder)"``, are meant and kept.)"""
    if value is None and optional:
        return
    try:
        re.compile(value)
    except (re.error, TypeError):
        alternative = " or None" if optional else ""
        raise ValueError(f"{owner_name(owner)}.{field} must be a regular expression{alternative}, got {value!r}"
                         ) from None
    if _empty_alternative(value):
        none = "; None names no tensor" if optional else ""
        raise ValueError(f"{owner_name(owner)}.{field}={value!r} has an empty alternative, so it would name every "
                         f"tensor (an empty pattern, or one such as 'lm_head|'): name the tensors it means{none}")


def _empty_alternative(pattern: str) -> bool:
    """Whether a regular expression is empty or has an empty top-level alternative (``"a|"``, ``"|a"``, ``"a||b"``);
    alternatives inside groups or classes are not looked into."""
    depth, branch, escaped, in_class = 0, 0, False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            if branch == 0:
                return True
            branch = 0
            continue
        branch += 1
    return branch == 0


def check_device(owner: Owner, value: Any) -> None:
    """Validate a ``device`` argument: None (the GPU when one is present) or a name torch parses."""
    if value is None:
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{owner_name(owner)}.device must be None, 'cpu' or 'cuda[:i]', got {value!r}") from None


def compute_device(owner: Owner, device: str | None) -> torch.device:
    """Where a strategy with a ``device`` argument computes (OPCM's SVDs, DOP's and WUDI's optimisation):
    ``device``, or the GPU when one is present.

    Raises:
        ValueError: ``device`` names CUDA and none is available, naming the argument and the remedy.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner_name(owner)}(device={device!r}): no CUDA device is available; leave device=None "
                         "or use 'cpu'")
    return resolved


def check_expert_count(owner: Owner, count: int, low: int, high: int | None, hint: str) -> None:
    """Refuse a merge of ``count`` experts outside ``[low, high]`` (``high`` None: no upper bound).

    Args:
        owner: the strategy class (or a caller's name) the message names.
        count: the number of experts (the base not counted).
        low: the fewest experts the method merges.
        high: the most, or None.
        hint: what to do instead, appended to the message.

    Raises:
        ValueError: naming the owner, the accepted count and ``count``.
    """
    if low <= count and (high is None or count <= high):
        return
    if high == low:
        want = f"exactly {low} expert{'s' if low != 1 else ''}"
    elif high is None:
        want = f"at least {low} experts"
    else:
        want = f"{low} to {high} experts"
    raise ValueError(f"{owner_name(owner)} merges {want} (the base not counted), got {count}; {hint}")


def set_field(obj: Any, field: str, value: Any) -> None:
    """Set a field of a frozen dataclass while it is constructed (normalising an argument in ``__post_init__``)."""
    object.__setattr__(obj, field, value)


__all__ = [
    "CANCELLING",
    "Owner",
    "PerExpert",
    "check_bool",
    "check_choice",
    "check_expert_count",
    "check_int",
    "check_number",
    "check_precision_weights",
    "check_weights_so_far",
    "normalizing_sum",
    "owner_name",
    "set_field",
]
