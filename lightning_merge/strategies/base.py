"""The Strategy contract (docs/design.md): an immutable, serialisable configuration that declares what it is, and
that every path (batch merge, continual state, adapter output, sweeps, recipes) asks instead of re-deriving it.

A strategy declares:

- ``requires``: the statistic kinds it reads; ``needs_base`` / ``uses_base``: whether a base is required / read;
- ``prepare(plan) -> Prepared``: the first pass for global quantities (model-wide norms, thresholds, LiNeS' α),
  returned as a :class:`Prepared` object instead of written into the strategy, so one strategy serves any number of
  merges at once; ``Prepared.merge_tensor(name, base, tensors, stats)`` is the pure function per tensor;
- ``linear_form``: its coefficients when the merge is linear in the experts (θ = c₀θ₀ + Σ cᵢθᵢ), per tensor;
  the exact PEFT adapter output uses them;
- ``continual_form()``: how it folds experts one at a time (running quantities, fold, finish), or an error saying
  why it cannot; a continual state asks for it when it is created;
- ``scalable``: whether ``scale`` (λ) enters as θ = θ₀ + λ·τ* with τ* independent of λ (``sweep_scale`` uses it);
- ``diagnose(plan, name, taus, merged)``: what a merge report shows of it at one tensor.

Declarations are read-only properties: a subclass declares a constant one with a class attribute
(``needs_base = False``) and one that depends on its arguments with a property (Fisher's ``requires``).
Argument checks live in :mod:`lightning_merge.strategies.checks`, statistic norms in
:mod:`lightning_merge.strategies.norms`, the names in :mod:`lightning_merge.strategies.registry`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.files.text import brief
from lightning_merge.strategies.checks import PerExpert
from lightning_merge.strategies.registry import STRATEGIES, Reference, by_class_path, lookup, register

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan


@dataclasses.dataclass(frozen=True)
class LinearForm:
    """A merge that is linear in the experts for one tensor: ``θ = base·θ₀ + Σᵢ experts[i]·θᵢ``.

    Attributes:
        base: c₀, the coefficient of the base.
        experts: cᵢ, one per expert.
    """

    base: float
    experts: tuple[float, ...]

    @property
    def preserves_base(self) -> bool:
        """c₀ + Σ cᵢ = 1: merging copies of the base gives the base, so ``θ = θ₀ + Σ cᵢ τᵢ`` (an adapter can hold
        the change)."""
        total = self.base + sum(self.experts)
        return abs(total - 1.0) <= 1e-9 * max(1.0, abs(self.base), *(abs(c) for c in self.experts))


class Prepared:
    """A strategy bound to the global quantities of one merge (what :meth:`Strategy.prepare` returns).

    Args:
        strategy: the strategy (unchanged: it is an immutable configuration).
        num_experts: the number of experts of this merge.
        values: the global quantities (norms, thresholds, α...), read by the strategy's ``merge_tensor``.
    """

    def __init__(self, strategy: Strategy, num_experts: int, **values: Any):
        self.strategy = strategy
        self.num_experts = num_experts
        self.values = values
        self._takes_prepared = _takes_prepared(type(strategy))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], stats: Sequence[Mapping[str, Tensor]]
    ) -> Tensor:
        """The merged tensor (float32): the strategy's rule with this merge's global quantities.

        Raises:
            ValueError: the strategy ``needs_base`` and ``base`` is None (no base model, or one without this tensor).
        """
        strategy = self.strategy
        if base is None and strategy.needs_base:
            raise ValueError(
                f"{type(strategy).__name__} needs a base model (base=...): tensor '{name}' has none; pass the base the "
                "experts were fine-tuned from, or leave the tensor out (exclude=..., or on_missing='base' to drop the "
                "tensors the base lacks)"
            )
        if not self._takes_prepared:  # a custom strategy written as merge_tensor(name, base, tensors, stats)
            return strategy.merge_tensor(name, base, tensors, stats)
        return strategy.merge_tensor(name, base, tensors, stats, self)

    def linear_form(self, name: str) -> LinearForm | None:
        """The strategy's linear coefficients for tensor ``name`` in this merge, or None when it is not linear."""
        return self.strategy.linear_form(self.num_experts, name, self)

    def summary(self) -> dict[str, Any]:
        """The prepared scalars (numbers, short lists of numbers) as plain values, for provenance records."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
            elif isinstance(value, (list, tuple)) and len(value) <= 64 and \
                    all(isinstance(v, (int, float)) for v in value):
                out[key] = list(value)
            elif isinstance(value, Prepared):
                inner = value.summary()
                if inner:
                    out[key] = inner
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r}, {', '.join(self.values)})"


def _takes_prepared(cls: type[Strategy]) -> bool:
    """Whether ``cls.merge_tensor`` takes the prepared merge: it has a parameter named ``prepared`` (the contract's
    signature) or ``*args``. Custom strategies written against the older ``merge_tensor(name, base, tensors, stats)``
    have neither and are called with four arguments."""
    try:
        params = inspect.signature(cls.merge_tensor).parameters
    except (TypeError, ValueError):
        return True
    return "prepared" in params or any(p.kind is p.VAR_POSITIONAL for p in params.values())


@dataclasses.dataclass(frozen=True)
class FoldContext:
    """What a continual form knows about the expert being folded in.

    Attributes:
        index: the expert's 0-based position (its index in the equivalent batch merge).
        weight: its scalar weight λᵢ.
        values: per-expert quantities computed once (a model-wide Fisher norm...).
    """

    index: int
    weight: float
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ContinualSummary:
    """What a continual state knows when it writes the merged model.

    Attributes:
        count: the number of experts folded in.
        norms: each expert's task-vector norm ‖τᵢ‖ (global L2 over the merged tensors).
        weights: each expert's weight λᵢ.
        totals: the sums over tensors of what :meth:`ContinualForm.reduce` returned.
        names: the merged tensors' names.
    """

    count: int
    norms: tuple[float, ...]
    weights: tuple[float, ...]
    totals: Mapping[str, float]
    names: tuple[str, ...] = ()


class ContinualForm:
    """How a strategy folds experts in one at a time, exactly: after adding experts 1..t the merged model equals
    the batch merge of experts 1..t with the same strategy.

    A continual state keeps, per merged tensor, the running quantities named in :attr:`quantities`; adding an
    expert reads them, calls :meth:`fold`, writes the new ones, and sums :meth:`reduce` over tensors; writing the
    merged model calls :meth:`finish` per tensor. Memory is one tensor's quantities at a time.
    """

    #: ``(name, dtype)`` of the running tensors kept per parameter (each of the parameter's shape).
    quantities: tuple[tuple[str, torch.dtype], ...] = ()

    #: :meth:`fold` and :meth:`finish` on rows ``[a, b)`` of their inputs give rows ``[a, b)`` of the whole results
    #: (and :meth:`reduce` returns nothing): a continual add then folds a large tensor in row chunks
    row_local: bool = False

    def working_set(self, kinds: int) -> float:
        """How many float32 copies of a tensor folding it holds at its peak (the base as stored and in float32, the
        expert, τ, the running quantities read and written, ``kinds`` statistics): a continual add's memory budget
        counts a tensor as this × its elements × 4 bytes. A form with larger temporaries (OPCM's SVD) says so."""
        return 5 + 2 * len(self.quantities) + kinds

    def begin(self, index: int, expert: Any, names: Sequence[str]) -> FoldContext:
        """Per-expert preparation (``expert`` is an :class:`~lightning_merge.Expert`; ``names`` the merged tensors)."""
        raise NotImplementedError

    def fold(
        self, name: str, running: Mapping[str, Tensor] | None, tau: Tensor, stats: Mapping[str, Tensor],
        ctx: FoldContext,
    ) -> dict[str, Tensor]:
        """The running quantities of tensor ``name`` after folding in an expert whose task vector is ``tau``
        (``running`` is None for the first expert)."""
        raise NotImplementedError

    def reduce(self, name: str, running: Mapping[str, Tensor]) -> dict[str, float]:
        """Scalars to sum over every tensor after a fold (OPCM's ‖S‖²); none by default."""
        return {}

    def finish(self, name: str, base: Tensor, running: Mapping[str, Tensor], summary: ContinualSummary) -> Tensor:
        """The merged tensor (float32) from the running quantities."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base class of every merge strategy: an immutable, validated, serialisable configuration.

    Subclasses are frozen dataclasses (``@dataclasses.dataclass(frozen=True)``) whose fields are the arguments;
    :meth:`to_dict` / :meth:`from_dict` round-trip through plain values (recipes, ``--set``, LightningCLI, the
    continual journal). A custom strategy implements :meth:`merge_tensor` and, when it needs a first pass over the
    model, :meth:`prepare`.

    Class attributes:
        name: the name used in recipes and ``to_dict()`` (``"ties"``, ``"fisher"``...); a class with a name is
            registered under it (:mod:`~lightning_merge.strategies.registry`, which refuses a name taken twice).
        reference: the published method it implements (paper and reference code), or None.

    Declarations (read-only properties; a subclass overrides one with a class attribute when it is constant, with a
    property when it depends on the arguments): :attr:`requires`, :attr:`needs_base`, :attr:`uses_base`,
    :attr:`scalable`, :attr:`global_pass`.
    """

    name: ClassVar[str] = ""
    reference: ClassVar[Reference | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    # -- declarations -------------------------------------------------------------------------------------------
    @property
    def requires(self) -> tuple[str, ...]:
        """Statistic kinds the strategy reads for every expert (``"fisher"``, ``"exp_avg_sq"``); none by default."""
        return ()

    @property
    def needs_base(self) -> bool:
        """Whether a base model is required (:meth:`Prepared.merge_tensor` refuses a tensor without one)."""
        return True

    @property
    def uses_base(self) -> bool:
        """Whether the base is read when one is given (Linear ignores it)."""
        return True

    @property
    def scalable(self) -> bool:
        """``scale`` enters as θ = θ₀ + scale·τ* with τ* independent of it (``sweep_scale`` relies on it)."""
        return False

    @property
    def global_pass(self) -> bool:
        """:meth:`prepare` reads the plan (norms, thresholds): ``merge_tensor`` then needs its result."""
        return False

    @property
    def row_local(self) -> bool:
        """For a tensor of two or more dimensions, ``merge_tensor`` on rows ``[a, b)`` of every input (the base, the
        experts, their elementwise statistics) gives rows ``[a, b)`` of the merged tensor, bit for bit, with the same
        prepared merge: the engine then merges a large tensor in row chunks within its memory budget. False by
        default, and for rules that read a whole tensor (a top-k or a norm per tensor, an SVD, a mask drawn per
        tensor): those tensors are merged whole, one at a time when they exceed the budget."""
        return False

    @property
    def row_pass(self) -> bool:
        """Row-local once a pass over the tensor's rows has computed what the rule needs of the whole tensor (TIES'
        per-tensor top-k threshold and its ties): :meth:`prepare_rows` returns one prepared merge per row chunk."""
        return False

    def prepare_rows(self, prepared: Prepared, plan: MergePlan, name: str,
                     chunks: Sequence[tuple[int, int]]) -> list[Prepared]:
        """For a strategy with :attr:`row_pass`: read tensor ``name`` chunk by chunk (``plan.base_tensor(name, rows)``,
        ``plan.expert_tensors(name, base, rows)``) and return the prepared merge of each chunk, with which
        ``merge_tensor`` on the chunk's rows gives those rows of the whole merge bit for bit."""
        raise NotImplementedError(f"{type(self).__name__} has no row pass")

    def working_set(self, num_experts: int) -> float:
        """How many float32 copies of a tensor a merge of it holds at its peak, counting its inputs (experts, base,
        statistics), the temporaries of ``merge_tensor`` and the output: the engine's memory budget counts a job as
        this × the tensor's (or the chunk's) elements × 4 bytes. The default, 2n + 5 + 2nk for n experts and k
        statistic kinds (the inputs, a stack of task vectors, each statistic and the precision derived from it, the
        result and its cast), is what task arithmetic, TIES, DARE, Fisher and OTA were measured to hold (9–15 copies
        for 3 experts; benchmarks/merge_memory.py); a strategy that allocates more (the weighted median's sort) or
        less (linear) says so."""
        return 2 * num_experts + 5 + 2 * num_experts * len(self.requires)

    def tensor_working_set(self, num_experts: int, name: str, shape: tuple[int, ...]) -> float:
        """:meth:`working_set` for tensor ``name`` of ``shape``: what the engine's budget counts a job by (× its
        elements × 4 bytes). The same for every tensor by default; a strategy whose temporaries are not of the
        tensor's shape (CAT Merging's (out × out) conflict matrices and (in × in) Grams) or differ by its number of
        dimensions (WIDEN) says so here."""
        return self.working_set(num_experts)

    # -- the contract -------------------------------------------------------------------------------------------
    def prepare(self, plan: MergePlan) -> Prepared:
        """The first pass for global quantities; the default checks per-expert argument lengths.

        Args:
            plan: what will be merged: tensor names, shapes, the experts; reads only what is asked for.

        Returns:
            A :class:`Prepared` holding this merge's global quantities (the strategy itself is not changed).
        """
        self.check_num_experts(plan.num_experts)
        return Prepared(self, plan.num_experts)

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        stats: Sequence[Mapping[str, Tensor]],
        prepared: Prepared | None = None,
    ) -> Tensor:
        """Merge one tensor.

        Args:
            name: the tensor's name (after any prefix was stripped).
            base: the base model's tensor in float32; None only for a strategy that does not :attr:`needs_base`
                (:meth:`Prepared.merge_tensor`, through which every merge calls this, refuses a missing base).
            tensors: the experts' tensors in float32, in expert order.
            stats: ``stats[i]`` maps each kind in :attr:`requires` to expert ``i``'s float32 statistic.
            prepared: the result of :meth:`prepare` for this merge (needed when :attr:`global_pass`).

        Returns:
            The merged tensor in float32, of the same shape.
        """
        raise NotImplementedError

    def linear_form(
        self, num_experts: int, name: str | None = None, prepared: Prepared | None = None
    ) -> LinearForm | None:
        """The coefficients of a merge linear in the experts for tensor ``name`` (None: not linear)."""
        return None

    @property
    def linear(self) -> bool:
        """Whether :meth:`linear_form` is defined for every tensor (known from the configuration alone)."""
        return False

    def continual_form(self) -> ContinualForm:
        """How this strategy folds experts in one at a time.

        Raises:
            NoContinualForm: it cannot (the message says why and what to use instead).
        """
        raise NoContinualForm(
            f"strategy {self.name!r} has no continual form: its merge needs every expert at once; use one of "
            f"{', '.join(continual_strategy_names())}"
        )

    def diagnose(self, plan: MergePlan, name: str, taus: Tensor, merged: Tensor) -> dict[str, Any]:
        """What a merge report (:func:`lightning_merge.tools.diagnostics.report`) shows of this strategy at one
        tensor. The default, which holds for any strategy, is the norm of the merged task vector; a strategy adds what
        it keeps of each expert, computed from its prepared form (``plan.prepared``).

        Args:
            plan: the merge's plan: ``plan.prepared`` is this strategy's :class:`Prepared`, ``plan.stats(name)`` the
                experts' statistics of the tensor.
            name: the tensor's name.
            taus: the experts' task vectors ``(N, *shape)`` in float32; this is their last use, so a strategy may
                change them in place.
            merged: the merged task vector θ* − θ₀ in float32.

        Returns:
            ``{"merged_norm": ‖θ* − θ₀‖₂, ...}``: plain numbers and lists, as ``report.json`` holds them.
        """
        return {"merged_norm": float(torch.linalg.vector_norm(merged, dtype=torch.float64))}

    def _unprepared(self, num_experts: int) -> Prepared:
        """The prepared object of a strategy without a global pass (merge_tensor called directly)."""
        if self.global_pass:
            raise RuntimeError(
                f"{type(self).__name__}.merge_tensor needs this merge's global quantities: call "
                f"prepared = strategy.prepare(plan) and prepared.merge_tensor(...) (lightning_merge.merge does)"
            )
        return Prepared(self, num_experts)

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-value description: ``{"name": ..., **arguments}``; ``Strategy.from_dict`` rebuilds it."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return {"name": self.name, **values}

    @staticmethod
    def from_dict(spec: Mapping[str, Any]) -> Strategy:
        """Build a strategy from ``{"name": ..., **arguments}`` (the output of :meth:`to_dict`), or from the
        LightningCLI form ``{"class_path": "lightning_merge.Ties", "init_args": {...}}``.

        Raises:
            ValueError: unknown name, class or argument, naming the valid ones.
        """
        spec = dict(spec)
        if "class_path" in spec:
            return _from_class_path(spec)
        name = spec.pop("name", None)
        cls = lookup(name)
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ValueError(
                f"strategy {name!r} has no argument {', '.join(map(brief, unknown[:5]))}; "
                f"its arguments are: {', '.join(sorted(valid)) or '(none)'}"
            )
        return cls(**spec)

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    def _per_expert_fields(self) -> tuple[str, ...]:
        """Names of arguments that may be a list with one value per expert."""
        return ()

    def check_num_experts(self, num_experts: int) -> None:
        """Refuse per-expert lists whose length is not ``num_experts``."""
        for field in self._per_expert_fields():
            value = getattr(self, field)
            if isinstance(value, (list, tuple)) and len(value) != num_experts:
                raise ValueError(
                    f"{type(self).__name__}.{field} has {len(value)} values but {num_experts} experts are merged; "
                    f"give one value per expert or a single number"
                )

    def per_expert(self, field: str, index: int, default: float) -> float:
        """Expert ``index``'s value of a per-expert argument (a number, a list, or None for ``default``)."""
        value = getattr(self, field)
        if value is None:
            return default
        if isinstance(value, (list, tuple)):
            if index >= len(value):
                raise ValueError(
                    f"{type(self).__name__}.{field} gives {len(value)} values, but this is expert {index + 1}; give "
                    "one value per expert or a single number"
                )
            return float(value[index])
        return float(value)

    def expert_weights(self, n: int) -> list[float]:
        """λᵢ of ``n`` experts from the ``weights`` argument (1 when None)."""
        return [self.per_expert("weights", i, 1.0) for i in range(n)]


def _plain(value: Any) -> Any:
    if isinstance(value, Strategy):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def _from_class_path(spec: dict[str, Any]) -> Strategy:
    path = str(spec.pop("class_path"))
    init_args = dict(spec.pop("init_args", None) or {})
    if spec:
        raise ValueError(f"a class_path strategy takes only class_path and init_args, got also {', '.join(spec)}")
    return Strategy.from_dict({"name": by_class_path(path).name, **init_args})


def continual_strategy_names() -> list[str]:
    """The registered strategies that have a continual form with their default arguments."""
    names = []
    for name, cls in sorted(STRATEGIES.items()):
        if cls.continual_form is Strategy.continual_form:
            continue
        try:
            cls().continual_form()
        except (NoContinualForm, TypeError, ValueError):
            continue
        names.append(name)
    return names



#: names this module held before 0.3 that moved: the argument checks and the statistic norms
_MOVED = {
    **dict.fromkeys(("CANCELLING", "check_bool", "check_choice", "check_int", "check_number", "check_precision_weights",
                     "check_weights_so_far", "normalizing_sum", "set_field"), "lightning_merge.strategies.checks"),
    **dict.fromkeys(("TINY", "Precision", "expert_norm", "model_norms"), "lightning_merge.strategies.norms"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lightning_merge.moved import forward

    return forward(__name__, _MOVED[name], name)


__all__ = [
    "ContinualForm",
    "ContinualSummary",
    "FoldContext",
    "LinearForm",
    "NoContinualForm",
    "PerExpert",
    "Prepared",
    "Reference",
    "STRATEGIES",
    "Strategy",
    "continual_strategy_names",
]
