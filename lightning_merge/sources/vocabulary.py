"""Experts read through a shared output vocabulary: the token-indexed tensors (input embeddings, LM head) of models
with different tokenizers, their rows permuted to the output tokenizer's ids, as mergekit's ``tokenizer_source`` /
``tokenizer:`` aligns them. The rule (which row a token absent from a model gets) is mergekit 0.1.5's:

- a token every model has keeps each model's own row (unless its ``tokens:`` entry says ``force``);
- otherwise the row comes from the token's ``tokens:`` entry when the recipe gives one (a model's row of that token,
  a model's row of another token, or zeros); else, when one model has the token, from that model; when the base has
  it, from the base; when several models (none the base) have it, their average; when none has it, zeros;
- rows past the vocabulary (``pad_to_multiple_of``) are each model's mean row over the vocabulary.

A model's missing rows are the same default row in every model, so where a model lacks a token its task vector is
the default's difference from the base's row there (zero when the base's row is the default). Statistics of a
token-indexed tensor are permuted the same way; a token a model lacks has a zero statistic there (the model carries
no curvature for it), the padding rows too.

This module is tokenizer-free: :mod:`lightning_merge.tools.tokenizer_merge` builds the output vocabulary and the
per-model token positions from the tokenizers (with transformers) and hands them here as integer tables.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_merge.files.safetensors import TensorSpec
from lightning_merge.sources.expert import Expert


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from (mergekit's ``tokens: {TOKEN: {source: ...}}``).

    Args:
        model: index of the model (in :attr:`VocabularyPlan.models` order) whose row is used; None for zeros.
        row: that model's row (its own id of the token, or of another token: ``kind: model_token``); None: the
            model's row of this very token (which it must have).
        force: use this row in every model, even those that have the token.
    """

    model: int | None
    row: int | None = None
    force: bool = False


@dataclass
class VocabularyPlan:
    """The output vocabulary and where each model's row of each output token is.

    Args:
        models: the models' display names, in the order of ``positions``.
        vocabulary: output token → output id (ids ``0 .. len - 1``).
        positions: per model, a ``(len(vocabulary),)`` int64 tensor: the model's row of output token ``i``, or -1
            when the model lacks it.
        size: the output's number of rows (``len(vocabulary)`` rounded up to ``pad_to_multiple_of``).
        tokens: the recipe's ``tokens:`` entries, by output token.
        base: index of the base model, or None.
        names: the token-indexed tensors (their names, axis 0 indexed by token).
    """

    models: list[str]
    vocabulary: dict[str, int]
    positions: list[Tensor]
    size: int
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    base: int | None = None
    names: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        n = len(self.vocabulary)
        for model, pos in zip(self.models, self.positions):
            if tuple(pos.shape) != (n,):
                raise ValueError(f"vocabulary positions of model '{model}' have shape {list(pos.shape)}, expected "
                                 f"[{n}]")
        if self.size < n:
            raise ValueError(f"the output vocabulary has {n} tokens but size {self.size}")
        by_id = sorted(self.vocabulary.values())
        if by_id != list(range(n)):
            raise ValueError("the output vocabulary's ids must be 0 .. len - 1, each once")
        self._defaults = self._default_sources()
        self._forced = [i for i, (_, entry) in self._defaults.items() if entry is not None and entry.force]

    def _default_sources(self) -> dict[int, tuple[str, TokenSource | None]]:
        """Output id → how its default row is made, for every token some model lacks or a ``force`` entry names:
        ``("entry", source)``, ``("average", None)`` or ``("none", None)``."""
        present = torch.stack(self.positions) >= 0  # (models, tokens)
        counts = present.sum(0)
        everywhere = counts == len(self.models)
        defaults: dict[int, tuple[str, TokenSource | None]] = {}
        for token, i in self.vocabulary.items():
            entry = self.tokens.get(token)
            if bool(everywhere[i]) and not (entry is not None and entry.force):
                continue
            if entry is not None:
                defaults[i] = ("entry", entry)
            elif int(counts[i]) == 1:
                defaults[i] = ("entry", TokenSource(model=int(present[:, i].nonzero()[0, 0])))
            elif int(counts[i]) == 0:
                defaults[i] = ("entry", TokenSource(model=None))
            elif self.base is not None and bool(present[self.base, i]):
                defaults[i] = ("entry", TokenSource(model=self.base))
            else:
                defaults[i] = ("average", None)
        return defaults

    def align(self, name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every model's tensor ``name`` (axis 0 indexed by its own token ids) with its rows in the output's order,
        each ``(size, *rest)``, in the dtype the models' dtypes promote to (mergekit's rule).

        Raises:
            ValueError: the tensors' other dimensions differ, or a ``tokens:`` entry names a row a model lacks.
        """
        if len(tensors) != len(self.models):
            raise ValueError(f"tensor '{name}': {len(tensors)} tensors for {len(self.models)} models")
        rest = tuple(tensors[0].shape[1:])
        for t in tensors:
            if tuple(t.shape[1:]) != rest:
                shapes = {m: list(x.shape) for m, x in zip(self.models, tensors)}
                raise ValueError(f"tensor '{name}' is token-indexed (axis 0) but its other dimensions differ between "
                                 f"the models ({shapes}); the models' architectures must match to align vocabularies")
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        defaults: dict[int, Tensor] = {}
        for i, (how, entry) in self._defaults.items():
            if how == "average":
                total = torch.zeros(rest, dtype=dtype)
                count = 0
                for pos, t in zip(self.positions, tensors):
                    row = int(pos[i])
                    if row >= 0:
                        total = total + t[row].to(dtype)
                        count += 1
                defaults[i] = total / count
                continue
            assert entry is not None
            if entry.model is None:
                defaults[i] = torch.zeros(rest, dtype=dtype)
                continue
            row = entry.row if entry.row is not None else int(self.positions[entry.model][i])
            source = tensors[entry.model]
            if entry.row is None and row < 0:
                raise ValueError(f"token {self.token_of(i)!r} takes its row of tensor '{name}' from model "
                                 f"'{self.models[entry.model]}', whose tokenizer lacks it; name another model, or a "
                                 "token of that one (kind: model_token), in the recipe's tokenizer.tokens entry")
            if not 0 <= row < source.shape[0]:
                token = self.token_of(i)
                raise ValueError(f"token {token!r} takes its row of tensor '{name}' from model "
                                 f"'{self.models[entry.model]}', which has no such row (row {row} of "
                                 f"{source.shape[0]}); fix the recipe's tokenizer.tokens entry")
            defaults[i] = source[row].to(dtype)
        n = len(self.vocabulary)
        out = []
        for model, (pos, t) in enumerate(zip(self.positions, tensors)):
            aligned = torch.zeros((self.size, *rest), dtype=dtype)
            keep = self._kept(model)
            rows_in = pos[keep]
            if rows_in.numel() and int(rows_in.max()) >= t.shape[0]:
                raise ValueError(f"tensor '{name}' has {t.shape[0]} rows, fewer than the tokenizer's ids need "
                                 f"({int(rows_in.max()) + 1}); the tensor and the tokenizer do not belong together")
            aligned[:n][keep] = t[rows_in].to(dtype)
            for i, row in defaults.items():
                if not bool(keep[i]):
                    aligned[i] = row
            if self.size > n:  # mergekit pads with the mean row (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
                aligned[n:] = aligned[:n].mean(dim=0)
            out.append(aligned)
        return out

    def align_statistic(self, model: int, value: Tensor) -> Tensor:
        """Model ``model``'s elementwise statistic of a token-indexed tensor in the output's rows: its own rows where
        it has the token (and no ``force`` entry replaces it), zero elsewhere."""
        pos = self.positions[model]
        keep = self._kept(model)
        out = torch.zeros((self.size, *value.shape[1:]), dtype=value.dtype)
        out[:len(self.vocabulary)][keep] = value[pos[keep]]
        return out

    def _kept(self, model: int) -> Tensor:
        """Which output tokens model ``model`` keeps its own row of: those it has, less the ``force`` entries."""
        keep = self.positions[model] >= 0
        if self._forced:
            keep[self._forced] = False
        return keep

    def token_of(self, index: int) -> str:
        for token, i in self.vocabulary.items():
            if i == index:
                return token
        return f"<id {index}>"


class VocabularyAlignment:
    """The experts of one merge read through a :class:`VocabularyPlan`: each token-indexed tensor is aligned for all
    models at once (a model's default rows can come from another model) when one of them first asks for it, and kept
    until another token-indexed tensor is asked for (the engine merges a tensor at a time).

    Args:
        plan: the output vocabulary and the models' positions.
        models: the models' experts, in the plan's order (each opened as itself).
    """

    def __init__(self, plan: VocabularyPlan, models: Sequence[Expert]):
        if len(models) != len(plan.models):
            raise ValueError(f"{len(models)} experts for a vocabulary plan of {len(plan.models)} models")
        self.plan = plan
        self.models = list(models)
        self._lock = threading.Lock()
        self._cached: tuple[str, list[Tensor]] | None = None

    def aligned(self, name: str, model: int) -> Tensor:
        with self._lock:
            if self._cached is None or self._cached[0] != name:
                self._cached = None  # the previous tensor's rows are released before the next are read
                missing = [e.name for e in self.models if name not in e]
                if missing:
                    raise KeyError(f"token-indexed tensor '{name}' is missing from {', '.join(missing)}; every model "
                                   "must have it to align the vocabularies")
                self._cached = (name, self.plan.align(name, [e.tensor(name) for e in self.models]))
            return self._cached[1][model]

    def expert(self, model: int, expert: Expert | None = None) -> Expert:
        """The aligned view of model ``model`` (or of ``expert``, a view of that model such as a subset)."""
        return AlignedExpert(self, model, expert if expert is not None else self.models[model])


class _AlignedSource:
    """The tensor source of an :class:`AlignedExpert`: token-indexed tensors from the alignment, others from the
    wrapped expert."""

    reads_rows = True

    def __init__(self, alignment: VocabularyAlignment, model: int, inner: Expert):
        self.alignment, self.model, self.inner = alignment, model, inner

    def keys(self) -> list[str]:
        return self.inner.names()

    def spec(self, key: str) -> TensorSpec:
        spec = self.inner.spec(key)
        if key not in self.alignment.plan.names:
            return spec
        dtype = spec.dtype
        for other in self.alignment.models:
            if key in other:
                dtype = torch.promote_types(dtype, other.spec(key).dtype)
        return TensorSpec(shape=(self.alignment.plan.size, *spec.shape[1:]), dtype=dtype)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        if key in self.alignment.plan.names:
            value = self.alignment.aligned(key, self.model)
            return value if rows is None else value[rows[0]:rows[1]]
        return self.inner.tensor(key, rows)


class AlignedExpert(Expert):
    """An expert read in the output vocabulary's token order (see the module's docstring): its token-indexed
    tensors and their statistics have the output's rows; every other tensor and statistic is the wrapped expert's.

    Args:
        alignment: the merge's :class:`VocabularyAlignment`.
        model: this expert's index in the alignment's plan.
        inner: the expert to read through it.
    """

    def __init__(self, alignment: VocabularyAlignment, model: int, inner: Expert) -> None:  # noqa: D107
        self.__dict__.update(copy.copy(inner).__dict__)  # name, path, url, statistics, adapter... as the inner's
        self._source = _AlignedSource(alignment, model, inner)
        self._keys = {n: n for n in inner.names()}
        self._alignment, self._model, self._inner = alignment, model, inner

    def sources(self) -> list:
        return self._inner.sources()

    def subset(self, names: list[str] | set[str]) -> Expert:
        return AlignedExpert(self._alignment, self._model, self._inner.subset(names))

    def statistic(self, name: str, kind: str, estimator: str | None = None,
                  rows: tuple[int, int] | None = None) -> Tensor:
        if name not in self._alignment.plan.names:
            return self._inner.statistic(name, kind, estimator, rows)
        if kind == "gram":
            raise ValueError(f"tensor '{name}' is token-indexed: it has no Gram matrix (not a linear layer's input)")
        value = self._alignment.plan.align_statistic(self._model, self._inner.statistic(name, kind, estimator))
        return value if rows is None else value[rows[0]:rows[1]]


def positions_of(vocabulary: Mapping[str, int], model_vocabulary: Mapping[str, int], rows: int) -> Tensor:
    """A model's row of every output token: ``model_vocabulary[token]`` when the model has the token at a row below
    ``rows`` (its embedding's rows: an id past them is a tokenizer entry the model has no row for), else -1."""
    out = torch.full((len(vocabulary),), -1, dtype=torch.int64)
    for token, i in vocabulary.items():
        j = model_vocabulary.get(token)
        if j is not None and 0 <= j < rows:
            out[i] = j
    return out


__all__ = ["AlignedExpert", "TokenSource", "VocabularyAlignment", "VocabularyPlan", "positions_of"]
