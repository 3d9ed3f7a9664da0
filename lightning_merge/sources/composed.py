"""An expert made of other experts' tensors under new names: the inputs of a layer-sliced merge (mergekit's
``slices``), where output layer ``j`` reads layer ``start + offset`` of one model or another."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from lightning_merge.files.safetensors import TensorSpec
from lightning_merge.sources.expert import Expert


class _Composed:
    """The tensor source of a :class:`ComposedExpert`: each name read from (expert, its name there)."""

    def __init__(self, table: Mapping[str, tuple[Expert, str]]):
        self.table = dict(table)

    def keys(self) -> list[str]:
        return list(self.table)

    def spec(self, key: str) -> TensorSpec:
        expert, name = self.table[key]
        return expert.spec(name)

    reads_rows = True  # get(key, rows) asks the expert holding it for those rows

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        expert, name = self.table[key]
        return expert.tensor(name, rows)


class ComposedExpert(Expert):
    """A read-only expert whose tensor ``name`` is tensor ``table[name][1]`` of expert ``table[name][0]``; nothing
    is read until a tensor is asked for.

    Args:
        table: output name → (the expert holding it, its name there), in output order.
        name: the display name (messages, provenance).
        path: the folder whose support files (config, tokenizer) a folder output copies; None for none.

    Example::

        layers = ComposedExpert({"model.layers.0.mlp.up_proj.weight": (a, "model.layers.3.mlp.up_proj.weight")},
                                name="slice view")
    """

    def __init__(self, table: Mapping[str, tuple[Expert, str]], *, name: str, path: Path | None = None) -> None:
        super().__init__({}, name=name)
        self._source = _Composed(table)
        self._keys = {k: k for k in table}
        self.path = path
        self._parts = list({id(e): e for e, _ in table.values()}.values())

    def sources(self) -> list[Path | str]:
        """Every file and folder the composed experts read (an output must be none of them)."""
        found: list[Path | str] = [] if self.path is None else [self.path]
        for expert in self._parts:
            found.extend(expert.sources())
        return found


__all__ = ["ComposedExpert"]
