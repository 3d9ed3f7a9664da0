"""An expert whose checkpoint leaves out a tensor tied to another (an LM head tied to the input embedding: the
checkpoint holds the embedding once), read as if it held both: the left-out name gives the tied tensor, its
statistics too. mergekit reads such a model the same way (its architectures' ``tied_names``), so a base with tied
embeddings merges with experts that trained their own LM head."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor

from lightning_merge.files.safetensors import TensorSpec
from lightning_merge.sources.expert import Expert


class _TiedSource:
    """The tensor source of a :class:`TiedExpert`: a tied name reads the tensor it is tied to."""

    reads_rows = True

    def __init__(self, inner: Expert, tied: Mapping[str, str]):
        self.inner, self.tied = inner, dict(tied)

    def keys(self) -> list[str]:
        return [*self.inner.names(), *self.tied]

    def spec(self, key: str) -> TensorSpec:
        return self.inner.spec(self.tied.get(key, key))

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        return self.inner.tensor(self.tied.get(key, key), rows)


class TiedExpert(Expert):
    """An expert that also answers to the names its checkpoint left out because they are tied to a tensor it holds.

    Args:
        inner: the expert as its files hold it.
        tied: each left-out name → the name of the tensor it is tied to (which ``inner`` holds), e.g.
            ``{"lm_head.weight": "model.embed_tokens.weight"}``.

    Raises:
        ValueError: a left-out name ``inner`` holds after all, or a target it does not hold.
    """

    def __init__(self, inner: Expert, tied: Mapping[str, str]) -> None:  # noqa: D107
        for name, target in tied.items():
            if name in inner:
                raise ValueError(f"expert '{inner.name}' holds '{name}' itself: it is not left out by a tie")
            if target not in inner:
                raise ValueError(f"expert '{inner.name}' has no tensor '{target}', to which '{name}' is tied")
        self.__dict__.update(copy.copy(inner).__dict__)  # name, path, url, statistics, adapter... as the inner's
        self._source = _TiedSource(inner, tied)
        self._keys = {n: n for n in self._source.keys()}
        self._inner, self.tied = inner, dict(tied)

    def sources(self) -> list:
        return self._inner.sources()

    def statistic(self, name: str, kind: str, estimator: str | None = None,
                  rows: tuple[int, int] | None = None) -> Tensor:
        return self._inner.statistic(self.tied.get(name, name), kind, estimator, rows)


__all__ = ["TiedExpert"]
