"""The strategy registry (lightning_merge.strategies.registry): one class per name, a published reference for every
method the package implements, and names that round-trip through ``to_dict`` / ``from_dict``."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings

import pytest
from strategy_variants import VARIANTS, library

from lightning_merge import strategies as S
from lightning_merge.strategies import STRATEGIES, Strategy, registry

_library = library
_VARIANTS = VARIANTS


@pytest.mark.parametrize("name", _library())
def test_every_strategy_names_the_method_it_implements(name):
    ref = registry.reference(name)
    assert isinstance(ref, registry.Reference), f"{name} declares no reference"
    assert ref.paper.startswith("https://"), ref.paper
    assert isinstance(ref.code, tuple) and all(url.startswith("https://github.com/") for url in ref.code), ref.code
    assert STRATEGIES[name].reference is ref


def test_the_variants_cover_every_strategy():
    assert sorted({s.name for s in _VARIANTS}) == _library()


@pytest.mark.parametrize("strategy", [STRATEGIES[n]() for n in _library()] + _VARIANTS,
                         ids=[f"{n}-default" for n in _library()] + [s.name for s in _VARIANTS])
def test_from_dict_rebuilds_to_dict(strategy):
    spec = strategy.to_dict()
    again = Strategy.from_dict(spec)
    assert type(again) is type(strategy) and again == strategy and again.to_dict() == spec
    cli = Strategy.from_dict({"class_path": f"lightning_merge.{type(strategy).__name__}",
                              "init_args": {k: v for k, v in spec.items() if k != "name"}})
    assert cli == strategy


def test_a_name_taken_by_another_class_is_refused_and_keeps_its_class():
    before = dict(STRATEGIES)
    with pytest.raises(ValueError, match=r"strategy name 'ties' of .*Impostor is already taken by "
                                         r"lightning_merge\.strategies\.task_vectors\.Ties"):
        @dataclasses.dataclass(frozen=True)
        class Impostor(Strategy):
            name = "ties"
    assert dict(STRATEGIES) == before and Strategy.from_dict({"name": "ties"}) == S.Ties()


def test_defining_the_same_class_again_replaces_it():
    """A reloaded module or a re-run notebook cell defines the same class (same module and qualified name) again."""

    def define():
        @dataclasses.dataclass(frozen=True)
        class Redefined(Strategy):
            name = "test_registry_redefined"

        return Redefined

    first, second = define(), define()
    assert first is not second and STRATEGIES["test_registry_redefined"] is second


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown strategy 'tie'; known strategies: .*breadcrumbs, cabs"):
        registry.lookup("tie")
    with pytest.raises(ValueError, match="unknown strategy class 'x.Nope'; known: .*Breadcrumbs"):
        Strategy.from_dict({"class_path": "x.Nope"})
    with pytest.raises(ValueError, match=r"unknown strategy \[1\]"):
        Strategy.from_dict({"name": [1]})  # not a name at all (unhashable), named as given


def test_the_registry_is_read_only():
    with pytest.raises(TypeError):
        STRATEGIES["mine"] = S.Linear  # type: ignore[index]


@pytest.mark.parametrize("old, name, new", [
    ("lightning_merge.strategies.composed", "LiNeSPrepared", "lightning_merge.strategies.lines"),
    ("lightning_merge.strategies.composed", "Cabs", "lightning_merge.strategies.cabs"),
    ("lightning_merge.strategies.linear", "TaskVectorMerge", "lightning_merge.strategies.task_vectors"),
    ("lightning_merge.strategies.linear", "Ties", "lightning_merge.strategies.task_vectors"),
    ("lightning_merge.strategies.base", "check_number", "lightning_merge.strategies.checks"),
    ("lightning_merge.strategies.base", "model_norms", "lightning_merge.strategies.norms"),
])
def test_names_at_their_pre_split_paths_still_import_with_a_warning(old, name, new):
    sys.modules.pop("lightning_merge.strategies.composed", None)  # a moved module warns when it is first imported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
