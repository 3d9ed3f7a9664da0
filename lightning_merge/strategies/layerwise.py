"""Task arithmetic with one coefficient vector per block (layer): θ = θ₀ + scale · Σⱼ λⱼ(block) τⱼ.

Blocks are numbered as LiNeS numbers them (the first integer component of a tensor's name: ``layers.3.mlp.weight`` →
3), or named by any other ``pattern`` (its group; ``r"^(.*)$"`` gives every tensor its own coefficients, as
AdaMerging's layer-wise mode learns them). The coefficients usually come from
:func:`lightning_merge.quadratic_coefficients` with ``per_block=True``, from
:class:`lightning_merge.tools.adamerging.AdaMerging`, or from a per-layer search of your own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_merge.strategies import functional as F
from lightning_merge.strategies.base import LinearForm, NoContinualForm, Prepared, Strategy
from lightning_merge.strategies.checks import PerExpert, check_number, set_field
from lightning_merge.strategies.registry import Reference


@dataclasses.dataclass(frozen=True, eq=False)
class LayerwiseTaskArithmetic(Strategy):
    """Task arithmetic whose per-expert coefficients depend on the tensor's block.

    Args:
        coefficients: ``{block: [λ₁, …, λ_N]}``: block indices (as strings or integers; stored as strings, as in YAML
            and JSON), or whatever else ``pattern``'s group captures (tensor names with ``r"^(.*)$"``).
        default: the coefficients of tensors outside the listed blocks (None: 1 for every expert).
        scale: an overall step multiplying every coefficient (swept by ``sweep_scale``).
        pattern: the regular expression whose first group is a tensor's block (LiNeS' default: the block index;
            a group of digits is compared as a number, so ``"03"`` is block 3).
    """

    name = "layerwise_task_arithmetic"
    reference = Reference("https://arxiv.org/abs/2310.02575", ("https://github.com/EnnengYang/AdaMerging",))
    scalable = True

    coefficients: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    default: PerExpert = None
    scale: float = 1.0
    pattern: str = F.BLOCK_PATTERN

    def __post_init__(self) -> None:
        if not isinstance(self.coefficients, Mapping):
            raise ValueError("LayerwiseTaskArithmetic.coefficients must map block indices to per-expert lists, got "
                             f"{type(self.coefficients).__name__}")
        normalised: dict[str, list[float]] = {}
        for key, values in self.coefficients.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)) or str(key) == "" or \
                    (isinstance(key, int) and key < 0):
                raise ValueError(f"LayerwiseTaskArithmetic.coefficients: block {key!r} is not a non-negative integer "
                                 "or a non-empty name")
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"LayerwiseTaskArithmetic.coefficients[{key!r}] must be a list of per-expert "
                                 f"numbers, got {values!r}")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"LayerwiseTaskArithmetic.coefficients[{key!r}] holds {v!r}, not a finite number")
            normalised[_block_key(str(key))] = [float(v) for v in values]
        lengths = {len(v) for v in normalised.values()}
        if len(lengths) > 1:
            raise ValueError(f"LayerwiseTaskArithmetic.coefficients: the blocks list different numbers of experts "
                             f"({sorted(lengths)})")
        set_field(self, "coefficients", normalised)
        if self.default is not None:
            check_number(type(self), "default", self.default, per_expert=True)
            if isinstance(self.default, (list, tuple)) and lengths and len(self.default) not in lengths:
                raise ValueError("LayerwiseTaskArithmetic.default must list as many experts as the blocks do")
        check_number(type(self), "scale", self.scale)
        try:
            if re.compile(self.pattern).groups != 1:
                raise re.error("needs one group")
        except (re.error, TypeError):
            raise ValueError("LayerwiseTaskArithmetic.pattern must be a regular expression with exactly one group "
                             f"capturing the block index, got {self.pattern!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerwiseTaskArithmetic) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items(), key=lambda kv: kv[0])))

    def _per_expert_fields(self) -> tuple[str, ...]:
        return ("default",)

    def check_num_experts(self, num_experts: int) -> None:
        super().check_num_experts(num_experts)
        for key, values in self.coefficients.items():
            if len(values) != num_experts:
                raise ValueError(f"LayerwiseTaskArithmetic.coefficients[{key!r}] lists {len(values)} coefficients for "
                                 f"{num_experts} experts")

    def coefficients_of(self, name: str, num_experts: int) -> list[float]:
        """The per-expert coefficients (scale included) of tensor ``name``."""
        found = re.search(self.pattern, name)
        values = self.coefficients.get(_block_key(found.group(1))) if found else None
        if values is None:
            values = [self.per_expert("default", i, 1.0) for i in range(num_experts)]
        return [self.scale * float(v) for v in values]

    @property
    def linear(self) -> bool:
        return True

    def continual_form(self) -> Any:
        raise NoContinualForm(
            "strategy 'layerwise_task_arithmetic' has no continual form: its coefficients belong to a fixed set of "
            "experts (one list entry per expert), which a continual state does not have; merge the set in one go, or "
            "fold with task_arithmetic"
        )

    def linear_form(self, num_experts: int, name: str | None = None, prepared: Prepared | None = None) -> LinearForm:
        """Tensor ``name``'s coefficients; without a name, those of tensors outside the listed blocks (every form
        has c₀ = 1 − Σcᵢ, so what holds of one, preserving the base, holds of all)."""
        c = self.coefficients_of(name, num_experts) if name is not None else \
            [self.scale * self.per_expert("default", i, 1.0) for i in range(num_experts)]
        return LinearForm(1.0 - sum(c), tuple(c))

    row_local = True  # one coefficient per expert and tensor

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        out = base.clone()
        for c, t in zip(self.coefficients_of(name, len(tensors)), tensors):
            out.add_(t - base, alpha=c)
        return out


def _block_key(key: str) -> str:
    """A block's key: digits as the number they write (``"03"`` → ``"3"``), any other text as it is."""
    return str(int(key)) if key.isdigit() else key


__all__ = ["LayerwiseTaskArithmetic"]
