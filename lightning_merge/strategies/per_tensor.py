"""One strategy per tensor: :class:`PerTensor` merges each tensor with the strategy its table names. Recipes build it
when mergekit parameters vary over the model (per-layer gradients such as ``weight: [0.2, 0.5, 0.8]``, ``filter:``
rules), resolving each tensor's parameters as mergekit does (:mod:`lightning_merge.tools.mergekit_parameters`);
any strategy, mergekit's or this project's, can be used per tensor this way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.files.text import brief
from lightning_merge.strategies.base import ContinualForm, LinearForm, Prepared, Strategy
from lightning_merge.strategies.checks import set_field
from lightning_merge.strategies.registry import Reference

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


@dataclasses.dataclass(frozen=True, eq=False)
class PerTensor(Strategy):
    """Each tensor merged with its own strategy: ``tensors[name]`` indexes ``strategies``; tensors the table does
    not name use ``strategies[default]`` (None: such a tensor is an error, raised before any tensor is merged).

    The strategies must merge tensor by tensor (no model-wide first pass: a model-wide threshold or norm would
    differ from strategy to strategy); each keeps its own algebra: the merge is linear at a tensor where that
    tensor's strategy is, and it has no continual form (the strategies differ by tensor, and a continual state
    folds with one).

    Args:
        strategies: the strategies, as objects or as ``Strategy.to_dict()`` writes them.
        tensors: ``{tensor name: index into strategies}``.
        default: the index of the strategy of tensors not in ``tensors`` (None: none is allowed).
    """

    name = "per_tensor"
    reference = Reference("https://arxiv.org/abs/2403.13257",
                          ("https://github.com/arcee-ai/mergekit/blob/main/mergekit/config.py",))

    strategies: Sequence[Any] = ({"name": "task_arithmetic"},)
    tensors: Mapping[str, int] = dataclasses.field(default_factory=dict)
    default: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategies, (list, tuple)) or not self.strategies:
            raise ValueError("PerTensor.strategies must be a non-empty list of strategies, got "
                             f"{brief(self.strategies)}")
        built = []
        for i, spec in enumerate(self.strategies):
            try:
                s = spec if isinstance(spec, Strategy) else Strategy.from_dict(spec)
            except (TypeError, ValueError, AttributeError) as err:
                raise ValueError(f"PerTensor.strategies[{i}]: {err}") from None
            if isinstance(s, PerTensor):
                raise ValueError(f"PerTensor.strategies[{i}] is itself a per_tensor strategy; list its strategies")
            if s.global_pass:
                raise ValueError(f"PerTensor.strategies[{i}] ({s.name}) reads the whole model in a first pass (a "
                                 "model-wide threshold or norm), which differs from strategy to strategy; use its "
                                 "per-tensor form (topk='tensor', weighting other than 'fisher')")
            built.append(s)
        set_field(self, "strategies", built)
        if not isinstance(self.tensors, Mapping):
            raise ValueError(f"PerTensor.tensors must map tensor names to indices, got {brief(self.tensors)}")
        for key, index in self.tensors.items():
            self._check_index(f"tensors[{key!r}]", index)
        set_field(self, "tensors", dict(self.tensors))
        if self.default is not None:
            self._check_index("default", self.default)

    def _check_index(self, where: str, index: Any) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.strategies):
            raise ValueError(f"PerTensor.{where} must be an index into strategies (0 to {len(self.strategies) - 1}), "
                             f"got {brief(index)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerTensor) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "strategies": [s.to_dict() for s in self.strategies], "tensors": dict(self.tensors),
                "default": self.default}

    def strategy_of(self, name: str) -> Strategy:
        """The strategy tensor ``name`` is merged with.

        Raises:
            ValueError: the table does not name the tensor and there is no default.
        """
        index = self.tensors.get(name, self.default)
        if index is None:
            raise ValueError(f"PerTensor has no strategy for tensor '{name}': the table names {len(self.tensors)} "
                             "tensors and there is no default; name it (or give default=)")
        return self.strategies[index]

    # -- declarations -------------------------------------------------------------------------------------------
    @property
    def requires(self) -> tuple[str, ...]:
        kinds: list[str] = []
        for s in self.strategies:
            kinds.extend(k for k in s.requires if k not in kinds)
        return tuple(kinds)

    @property
    def needs_base(self) -> bool:
        return any(s.needs_base for s in self.strategies)

    @property
    def uses_base(self) -> bool:
        return any(s.uses_base for s in self.strategies)

    @property
    def linear(self) -> bool:
        return all(s.linear for s in self.strategies)

    def linear_form(self, num_experts: int, name: str | None = None, prepared: Prepared | None = None
                    ) -> LinearForm | None:
        """The form of tensor ``name``'s strategy; without a name, the one form every strategy shares (None when
        they differ, or one is not linear)."""
        if name is not None:
            return self.strategy_of(name).linear_form(num_experts, name)
        forms = {s.linear_form(num_experts) for s in self.strategies}
        return forms.pop() if len(forms) == 1 else None

    def continual_form(self) -> ContinualForm:
        raise NoContinualForm(
            "strategy 'per_tensor' (parameters that vary by layer or by tensor name: mergekit's gradients and filters) "
            "has no continual form: a continual state folds every tensor with one strategy; merge the set in one go, "
            "or give each parameter one value"
        )

    def check_num_experts(self, num_experts: int) -> None:
        for s in self.strategies:
            s.check_num_experts(num_experts)

    # -- the contract -------------------------------------------------------------------------------------------
    def prepare(self, plan: MergePlan) -> Prepared:
        """Checks every tensor of the merge has a strategy (before any is merged) and each strategy's lists match
        the number of experts."""
        self.check_num_experts(plan.num_experts)
        for name in plan.names:
            self.strategy_of(name)
        return Prepared(self, plan.num_experts)

    @property
    def row_local(self) -> bool:
        """When every strategy of the table is."""
        return all(s.row_local for s in self.strategies)

    def working_set(self, num_experts: int) -> float:
        return max(s.working_set(num_experts) for s in self.strategies)

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """The working set of the strategy that merges tensor ``name``."""
        return self.strategy_of(name).tensor_working_set(num_experts, name, shape)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        return Prepared(self.strategy_of(name), len(tensors)).merge_tensor(name, base, tensors, stats)


__all__ = ["PerTensor"]
