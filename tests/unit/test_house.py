"""The house rules of the package layout (issue 28): one base under every error, old module paths that still import
(the same module, with a DeprecationWarning), the names that lived in the old ``engine`` and ``continual`` modules,
and the console script."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import lightning_merge
from lightning_merge import errors
from lightning_merge.moved import MOVED


def _resolve(target: str):
    """``module:attribute`` (an entry point's value) to the object it names."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_class_derives_from_the_one_base(name):
    cls = getattr(errors, name)
    assert inspect.isclass(cls) and issubclass(cls, errors.LightningMergeError), name


def test_every_error_class_errors_defines_is_listed():
    defined = {name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__}
    assert defined == set(errors.__all__)


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_an_old_module_path_is_the_new_module_with_a_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # a cached import would not warn again
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new}")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("package,name", [("lightning_merge.engine", "merge"),
                                          ("lightning_merge.continual", "ContinualState")])
def test_names_of_the_old_one_module_packages_resolve_with_a_warning(package, name):
    with pytest.warns(DeprecationWarning, match=re.escape(f"{package}.{name} moved to")):
        value = getattr(importlib.import_module(package), name)
    assert value is getattr(lightning_merge, name)


def test_the_console_script_in_pyproject_is_the_command_line(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    with pytest.raises(SystemExit) as done:
        _resolve(scripts["lightning-merge"])(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-merge {lightning_merge.__version__}"


@pytest.mark.slow
def test_the_entry_point_of_earlier_installs_still_runs_the_command_line():
    """Installs made before 0.3 name ``lightning_merge.cli:main`` (``cli`` was a module); a console script resolves
    it in a fresh interpreter, as this one does."""
    code = ("from importlib.metadata import EntryPoint; "
            "EntryPoint('lightning-merge', 'lightning_merge.cli:main', 'console_scripts').load()(['--version'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"lightning-merge {lightning_merge.__version__}"
