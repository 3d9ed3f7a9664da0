"""Module paths from before 0.3, when every module sat at the package's root: importing one still works and gives
the module at its new place, with a :class:`DeprecationWarning` naming it (removed in 0.5)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

MOVED = {
    "lightning_merge.io": "lightning_merge.files.atomic",
    "lightning_merge.storage": "lightning_merge.files.remote",
    "lightning_merge.safetensors_io": "lightning_merge.files.safetensors",
    "lightning_merge.torch_io": "lightning_merge.files.torch_load",
    "lightning_merge.progress": "lightning_merge.files.progress",
    "lightning_merge.ownership": "lightning_merge.files.ownership",
    "lightning_merge.outputs": "lightning_merge.files.outputs",
    "lightning_merge.stats": "lightning_merge.formats.sidecar",
    "lightning_merge.lora": "lightning_merge.formats.lora",
    "lightning_merge.tall": "lightning_merge.tools.tall",
    "lightning_merge.experts": "lightning_merge.sources.expert",
    "lightning_merge.writers": "lightning_merge.engine.writers",
    "lightning_merge.distributed": "lightning_merge.engine.distributed",
    "lightning_merge.fisher": "lightning_merge.capture.fisher",
    "lightning_merge.activations": "lightning_merge.capture.grams",
    "lightning_merge.averaging": "lightning_merge.tools.averaging",
    "lightning_merge.coefficients": "lightning_merge.tools.coefficients",
    "lightning_merge.diagnostics": "lightning_merge.tools.diagnostics",
    "lightning_merge.evaluation": "lightning_merge.tools.evaluation",
    "lightning_merge.recipe": "lightning_merge.tools.recipe",
    "lightning_merge.adamerging": "lightning_merge.tools.adamerging",
    "lightning_merge.variance": "lightning_merge.tools.variance",
    "lightning_merge.peft_models": "lightning_merge.tools.peft_models",
    "lightning_merge.testing": "lightning_merge.tools.testing",
    "lightning_merge.demo": "lightning_merge.cli.demo",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new} in lightning-merge 0.3; import it from there (or the public names from "
                  f"lightning_merge): the old path goes in 0.5", DeprecationWarning, stacklevel=3)


def forward(package: str, module: str, name: str) -> Any:
    """``package.name`` for a name that lived in the module ``package`` before it became a package."""
    if name.startswith("__"):
        raise AttributeError(name)
    target = importlib.import_module(module)
    try:
        value = getattr(target, name)
    except AttributeError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    _warn(f"{package}.{name}", f"{module}.{name}")
    return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new place (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        _warn(spec.name, MOVED[spec.name])
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: Any) -> None:
        pass  # the module at its new place is already executed


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


__all__ = ["MOVED", "forward", "install"]
