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
- ``scalable``: whether ``scale`` (λ) enters as θ = θ₀ + λ·τ* with τ* independent of λ (``sweep_scale`` uses it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_merge.errors import NoContinualForm
from lightning_merge.files.text import brief
from lightning_merge.formats.sidecar import StatisticsError

if TYPE_CHECKING:
    from lightning_merge.strategies.plan import MergePlan

STRATEGIES: dict[str, type[Strategy]] = {}
PerExpert = float | list[float] | None



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
        """The merged tensor (float32): the strategy's rule with this merge's global quantities."""
        if not self._takes_prepared:  # a custom strategy written as merge_tensor(name, base, tensors, stats)
            return self.strategy.merge_tensor(name, base, tensors, stats)
        return self.strategy.merge_tensor(name, base, tensors, stats, self)

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


def _takes_prepared(cls: type) -> bool:
    import inspect

    try:
        params = inspect.signature(cls.merge_tensor).parameters
    except (TypeError, ValueError):
        return True
    return "prepared" in params or any(p.kind is p.VAR_POSITIONAL for p in params.values()) or len(params) > 5


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
        name: the name used in recipes and ``to_dict()`` (``"ties"``, ``"fisher"``...).
        requires: statistic kinds the strategy reads for every expert (``"fisher"``, ``"exp_avg_sq"``).
        needs_base: whether a base model is required.
        uses_base: whether the base is read when one is given (Linear ignores it).
        scalable: ``scale`` enters as θ = θ₀ + scale·τ* with τ* independent of it (``sweep_scale`` relies on it).
        global_pass: :meth:`prepare` reads the plan (norms, thresholds): ``merge_tensor`` then needs its result.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_base: ClassVar[bool] = True
    uses_base: ClassVar[bool] = True
    scalable: ClassVar[bool] = False
    global_pass: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            STRATEGIES[cls.name] = cls

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
            base: the base model's tensor in float32, or None when there is no base.
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
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {brief(name)}; known strategies: {', '.join(sorted(STRATEGIES))}")
        cls = STRATEGIES[name]
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
    short = path.rsplit(".", 1)[-1]
    matches = [cls for cls in STRATEGIES.values()
               if cls.__name__ == short or f"{cls.__module__}.{cls.__name__}" == path]
    if not matches:
        known = ", ".join(sorted(cls.__name__ for cls in STRATEGIES.values()))
        raise ValueError(f"unknown strategy class {path!r}; known: {known}")
    return Strategy.from_dict({"name": matches[0].name, **init_args})


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


def check_number(owner: str, field: str, value: Any, *, low: float | None = None, high: float | None = None,
                 per_expert: bool = False, finite: bool = True) -> None:
    """Validate a number (or a list of numbers when ``per_expert``) against an inclusive range."""
    values = value if per_expert and isinstance(value, (list, tuple)) else [value]
    if per_expert and isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{owner}.{field} is an empty list; give a number or one value per expert")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = "a number or a list of numbers" if per_expert else "a number"
            raise ValueError(f"{owner}.{field} must be {kind}, got {brief(value)}")
        if finite and not math.isfinite(v):
            raise ValueError(f"{owner}.{field} must be finite, got {v!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ValueError(f"{owner}.{field} must be in [{lo}, {hi}], got {v!r}")


#: normalising by Σw is refused when |Σw| is at most this fraction of Σ|w| (weights that cancel)
CANCELLING = 1e-6


def normalizing_sum(owner: str, weights: Sequence[float], what: str = "weights") -> float:
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
            f"{owner}.{what} [{listed}] sum to {total:g}: normalize=True divides by their sum, so the weighted average "
            "is undefined; give weights with a non-zero sum (e.g. positive ones), or normalize=False for the plain "
            "weighted sum"
        )
    return total


def check_precision_weights(owner: str, weights: PerExpert) -> None:
    """λᵢ of a precision-weighted mean (Fisher, OTA, ``weighting=``, the weighted median): numbers ≥ 0 (a negative
    weight makes Σ λᵢPᵢ vanish or change sign, and the quotient meaningless) and not all 0 (no expert would weigh
    anything: the merge would be the base). None (every λᵢ = 1) passes."""
    if weights is None:
        return
    check_number(owner, "weights", weights, per_expert=True, low=0)
    values = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    if not any(values):
        raise ValueError(f"{owner}.weights are all 0: no expert would have any weight in the merge; give a positive "
                         "weight to at least one expert")


def check_weights_so_far(strategy: Strategy, index: int) -> None:
    """In a continual state, the model after adding expert ``index`` is the precision-weighted mean of experts
    0..index: refused before any work when their weights are all 0 (it would be the base)."""
    if not any(strategy.per_expert("weights", i, 1.0) for i in range(index + 1)):
        raise ValueError(
            f"{type(strategy).__name__}.weights of the experts added so far, this one included, are all 0: the "
            "continual model would be the base; give this expert a positive weight"
        )


def check_choice(owner: str, field: str, value: Any, choices: Sequence[Any]) -> None:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {', '.join(map(repr, choices))}; got {brief(value)}")


def check_bool(owner: str, field: str, value: Any) -> None:
    """Validate a flag: ``True`` or ``False`` only (``1`` or ``"yes"`` are refused, though ``1 == True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{field} must be True or False, got {brief(value)}")


def check_int(owner: str, field: str, value: Any, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{owner}.{field} must be an integer{bound}, got {brief(value)}")


def set_field(obj: Any, field: str, value: Any) -> None:
    """Set a field of a frozen dataclass while it is constructed (normalising an argument in ``__post_init__``)."""
    object.__setattr__(obj, field, value)


#: an expert's elementwise weight derived from its statistic: ``precision(index, statistic)`` (a new tensor)
Precision = Callable[[int, Tensor], Tensor]


def _squares(index: int, value: Tensor, precision: Precision | None) -> tuple[float, float]:
    """Σ F² of one statistic tensor and Σ P² of the precision derived from it (in float64)."""
    raw = float(value.double().square().sum())
    return raw, raw if precision is None else float(precision(index, value).double().square().sum())


def _refuse_zero(expert: str, kind: str, raw: float, remedy: str) -> None:
    if raw == 0.0:
        raise StatisticsError(
            f"expert '{expert}' has a {kind!r} statistic that is zero on every merged tensor: normalising its weight "
            f"by that statistic's norm is undefined (it would take all the weight, or none). Its capture recorded no "
            f"gradient (frozen parameters? a loss without gradient?): capture it again or leave it out, or {remedy}"
        )


def model_norms(plan: MergePlan, kind: str, precision: Precision | None = None,
                remedy: str = "merge without normalize") -> list[float]:
    """Per expert, the L2 norm over every merged tensor of its statistic ``kind``, or of ``precision(i, F)``: the
    elementwise weight a strategy derives from it (Fisher merging's floored F̃ = max(F, floor) + eps). Normalising by
    the norm of the weight actually used keeps the floor and the normalisation consistent: a Fisher that lies below
    the floor almost everywhere is then an expert of uniform weight, not one whose tiny norm gives it all the weight.
    Reads statistics only.

    Raises:
        StatisticsError: an expert whose statistic is zero on every merged tensor (its normalisation is undefined);
            ``remedy`` ends the message.
    """
    parts = plan.map(lambda name: [_squares(i, v, precision) for i, v in enumerate(plan.statistics(name, kind))],
                     f"{kind} norms")
    raw = [0.0] * plan.num_experts
    squares = [0.0] * plan.num_experts
    for per_expert in parts.values():  # in plan order: one process's floats, however the pass was split
        for i, (r, value) in enumerate(per_expert):
            raw[i] += r
            squares[i] += value
    for i, r in enumerate(raw):
        _refuse_zero(plan.experts[i].name, kind, r, remedy)
    return [math.sqrt(s) for s in squares]


def expert_norm(expert: Any, names: Sequence[str], kind: str, precision: Precision | None = None, index: int = 0,
                remedy: str = "merge without normalize") -> float:
    """One expert's norm of its statistic ``kind`` (or of ``precision(index, F)``) over ``names``: the continual
    counterpart of :func:`model_norms`, with the same refusal of a statistic that is zero everywhere."""
    raw = squares = 0.0
    for n in names:
        r, value = _squares(index, expert.statistic(n, kind), precision)
        raw += r
        squares += value
    _refuse_zero(expert.name, kind, raw, remedy)
    return math.sqrt(squares)


TINY = torch.finfo(torch.float32).tiny


__all__ = [
    "ContinualForm",
    "ContinualSummary",
    "FoldContext",
    "LinearForm",
    "NoContinualForm",
    "PerExpert",
    "Prepared",
    "STRATEGIES",
    "Strategy",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_precision_weights",
    "check_weights_so_far",
    "continual_strategy_names",
    "normalizing_sum",
    "expert_norm",
    "model_norms",
]
