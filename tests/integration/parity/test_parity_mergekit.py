"""Parity with mergekit on the same inputs (runs when a mergekit install is found; mergekit is only a reference).

Point ``MERGEKIT_YAML`` at a ``mergekit-yaml`` executable (``.ci/run`` installs one in ``.venv-mergekit``).
"""

import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, reference_runs

from lightning_merge import Expert
from lightning_merge.cli.commands import main
from lightning_merge.tools.testing import llama_config, write_llama_family


def _mergekit_yaml():
    candidates = [
        os.environ.get("MERGEKIT_YAML"),
        shutil.which("mergekit-yaml"),
        str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


MERGEKIT = _mergekit_yaml()

#: runs recipes with mergekit's own run_merge (what mergekit-yaml calls), many in one process: each mergekit-yaml
#: start costs seconds of imports
_MANY = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
pairs = sys.argv[1:]
options = MergeOptions(quiet=True)
options.apply_global_options()
for recipe, out in zip(pairs[::2], pairs[1::2]):
    text = open(recipe, encoding="utf-8").read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
"""


#: mergekit-yaml's entry point, for a run with its command-line options (conftest.reference_runs)
MERGEKIT_YAML_MAIN = """
from mergekit.scripts.run_yaml import main
main(standalone_mode=False)
"""


#: :data:`_MANY` for vision-language models whose config transformers 5 reads with a ``text_config`` (Qwen2-VL):
#: mergekit 0.1.5's definitions read the text decoder's layer count and the vocabulary size (``num_hidden_layers``,
#: ``vocab_size``) on the top-level config, where transformers 4 kept them and transformers 5's ``Qwen2VLConfig`` has
#: neither (it holds them in ``text_config``, and moves a published checkpoint's top-level keys there), so mergekit
#: stops planning with ``RuntimeError: Config Qwen2VLConfig {...} has no attribute num_hidden_layers``. This patches
#: its ``get_config_value`` and ``set_config_value`` (in every module that imported them) to use ``text_config`` for a
#: plain key the top level lacks and ``text_config`` has, and nothing else; undone after the runs (the process serves
#: other tests).
_MANY_TEXT_CONFIG = """
import mergekit.architecture.base, mergekit.common, mergekit.merge, mergekit.tokenizer.build

get, put = mergekit.common.get_config_value, mergekit.common.set_config_value


def holder(config, key):
    if "." not in key and not hasattr(config, key) and hasattr(getattr(config, "text_config", None), key):
        return config.text_config
    return config


def get_config_value(config, key):
    return get(holder(config, key), key)


def set_config_value(config, key, value):
    put(holder(config, key), key, value)


modules = (mergekit.common, mergekit.architecture.base, mergekit.merge, mergekit.tokenizer.build)
patched = [(m, n, getattr(m, n)) for m in modules for n in ("get_config_value", "set_config_value") if hasattr(m, n)]
for m, n, _ in patched:
    setattr(m, n, get_config_value if n == "get_config_value" else set_config_value)
try:
""" + textwrap.indent(_MANY, "    ") + """
finally:
    for m, n, f in patched:
        setattr(m, n, f)
"""


def run_mergekit_many(pairs, text_config: bool = False) -> None:
    """Merge each ``(recipe, out)`` with mergekit (its ``run_merge``, the function ``mergekit-yaml`` calls), all in one
    process of mergekit's environment. ``text_config``: with its config reads patched for a vision-language model's
    ``text_config`` (:data:`_MANY_TEXT_CONFIG`)."""
    python = Path(MERGEKIT).with_name("python")
    args = [str(x) for pair in pairs for x in pair]
    reference_runs(python, _MANY_TEXT_CONFIG if text_config else _MANY, [args], Path(args[0]).parent)


def mergekit_outputs(root: Path, texts: dict, text_config: bool = False) -> dict:
    """``{case: (recipe file, mergekit's output folder)}`` for every recipe text, merged by mergekit in one process
    (``text_config``: see :func:`run_mergekit_many`)."""
    pairs = {}
    for case, text in texts.items():
        (root / f"{case}.yaml").write_text(text)
        pairs[case] = (root / f"{case}.yaml", root / case)
    run_mergekit_many(pairs.values(), text_config)
    return pairs


def ours(tmp_path: Path, recipe: Path) -> Path:
    """Our merge of a recipe file, through the command line."""
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "lm"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]

METHODS = {
    "linear": ("", "{weight: %s}"),
    "task_arithmetic": ("parameters: {lambda: 0.8}", "{weight: %s}"),
    "ties": ("parameters: {density: 0.3}", "{weight: %s}"),
    "ties_normalize_false": ("parameters: {density: 0.5, normalize: false}", "{weight: %s}"),
    "breadcrumbs": ("parameters: {density: 0.8, gamma: 0.05}", "{weight: %s}"),
    "breadcrumbs_ties": ("parameters: {density: 0.7, gamma: 0.02}", "{weight: %s}"),
    "dare_linear": ("parameters: {density: 1.0}", "{weight: %s}"),
    "dare_ties": ("parameters: {density: 1.0}", "{weight: %s}"),
    # della at density 1 draws nothing: the deterministic rest of the method (election, L1 rescale, normalize)
    "della": ("parameters: {density: 1.0, lambda: 0.9}", "{weight: %s}"),
    "della_linear": ("parameters: {density: 1.0}", "{weight: %s}"),
    "sce": ("parameters: {select_topk: 0.4}", "{weight: %s}"),  # sce takes no weight: ignored by both
    "sce_all": ("", "{weight: %s}"),
    "ram": ("parameters: {epsilon: 0.004}", "{weight: %s}"),
    "ramplus_tl": ("parameters: {r: 0.5, alpha: 0.6, epsilon: 0.002}", "{weight: %s}"),
}
#: recipe names whose mergekit method is another key's
ALIASES = {"ties_normalize_false": "ties", "sce_all": "sce"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    # float32 storage: no two task-vector entries share a magnitude. With bf16 storage many do, and at such ties
    # mergekit's pick follows torch's unstable argsort while ours keeps the lower flat index (docs/strategies.md).
    return write_llama_family(root, llama_config(), n_experts=3, delta_density=0.3, dtype=torch.float32)


def _method_recipe(method, base, experts) -> str:
    shared, per_model = METHODS[method]
    weights = ["1.0", "0.6", "1.4"]
    models = "\n".join(f"  - model: {e}\n    parameters: {per_model % w}" for e, w in zip(experts, weights))
    return textwrap.dedent(f"""\
        merge_method: {ALIASES.get(method, method)}
        {"" if method == "linear" else f"base_model: {base}"}
        dtype: float32
        {shared}
        models:
        """) + models + "\n"


@pytest.fixture(scope="module")
def mk_methods(tmp_path_factory, family):
    base, experts = family
    return mergekit_outputs(tmp_path_factory.mktemp("mk_methods"),
                            {m: _method_recipe(m, base, experts) for m in METHODS})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_result_as_mergekit(tmp_path, mk_methods, method):
    recipe, mk = mk_methods[method]
    theirs, ours_ = Expert(mk), Expert(ours(tmp_path, recipe))
    assert sorted(theirs.names()) == sorted(ours_.names())
    worst = 0.0
    for name in ours_.names():
        a, b = ours_.tensor(name), theirs.tensor(name)
        assert a.dtype == b.dtype == torch.float32
        worst = max(worst, float((a - b).abs().max()))
    assert worst <= 1e-6, f"{method}: largest difference {worst}"


# mergekit's geometric methods (issue 31): (base_model given, models with their weights or None, shared parameters)
GEOMETRIC = {
    "slerp": (True, [None], "parameters: {t: 0.3}"),
    "slerp_base_listed": (True, ["base", None], "parameters: {t: 0.7}"),
    "nuslerp": (True, [1.0, 0.6], ""),
    "nuslerp_rows": (True, [1.0, 0.6], "parameters: {nuslerp_flatten: false}"),
    "nuslerp_columns": (True, [0.4, 1.1], "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}"),
    "nuslerp_no_base": (False, [1.0, 0.6], ""),
    "multislerp": (True, [1.0, 0.6, 1.4], ""),
    "multislerp_unnormalized": (True, [0.5, 0.3, 0.4], "parameters: {normalize_weights: false}"),
    "multislerp_no_base": (False, [1.0, 0.6, 1.4], ""),
    "karcher": (False, [None, None, None], ""),
    "karcher_with_base": (True, [None, None], "parameters: {max_iter: 20, tol: 1.0e-6}"),
    "model_stock": (True, [None, None, None], ""),
    "model_stock_filter_wise": (True, [None, None], "parameters: {filter_wise: true}"),
    "nearswap": (True, [None], "parameters: {t: 0.004}"),
    "arcee_fusion": (True, [None], ""),
}


def relative_error(ours: Expert, theirs: Expert) -> float:
    """The largest difference of any tensor, relative to that tensor's largest magnitude."""
    assert sorted(theirs.names()) == sorted(ours.names())
    worst = 0.0
    for name in ours.names():
        a, b = ours.tensor(name), theirs.tensor(name)
        assert a.dtype == b.dtype == torch.float32, name
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return worst


def _geometric_recipe(case, base, experts) -> str:
    with_base, weights, shared = GEOMETRIC[case]
    method = case.split("_")[0] if case.split("_")[0] not in ("model", "arcee") else "_".join(case.split("_")[:2])
    lines, chosen = [], iter(experts)
    for w in weights:
        model = base if w == "base" else next(chosen)
        params = "" if w in (None, "base") else f"\n    parameters: {{weight: {w}}}"
        lines.append(f"  - model: {model}{params}")
    return (f"merge_method: {method}\n" + (f"base_model: {base}\n" if with_base else "")
            + f"dtype: float32\n{shared}\nmodels:\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def mk_geometric(tmp_path_factory, family):
    base, experts = family
    return mergekit_outputs(tmp_path_factory.mktemp("mk_geometric"),
                            {c: _geometric_recipe(c, base, experts) for c in GEOMETRIC})


@pytest.mark.parametrize("case", sorted(GEOMETRIC))
def test_geometric_methods_give_mergekits_model(tmp_path, mk_geometric, case):
    """slerp, nuslerp, multislerp, karcher, model_stock, nearswap and arcee_fusion: mergekit 0.1.5's model, float32,
    to 1e-5 relative, from the same recipe file."""
    recipe, mk = mk_geometric[case]
    worst = relative_error(Expert(ours(tmp_path, recipe)), Expert(mk))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"


# -- parameters that vary over the model: per-layer gradients and filter rules -------------------------------------

FEATURES = {
    # a gradient of weights per model and of the shared density, a boolean gradient (picked, not interpolated)
    "ties_gradients": ("ties", "parameters: {density: [0.2, 0.9], normalize: [true, false]}",
                       ["{weight: [0.2, 0.5, 0.8]}", "{weight: [1.0, 0.1]}", "{weight: 0.7}"]),
    "linear_gradient": ("linear", "", ["{weight: [0.2, 0.5, 0.8, 1.1]}", "{weight: [1.0, 0.1]}", "{weight: 0.7}"]),
    # filters: the first rule whose filter is in the name; a rule's value may be a gradient; no rule matching
    # falls back to the recipe's parameters (the shared lambda falls back to mergekit's default, 1)
    "task_arithmetic_filters": (
        "task_arithmetic",
        "parameters: {lambda: [{filter: mlp, value: 0.5}], weight: 0.4}",
        ["{weight: [{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.1, 0.9]}, {value: 1.0}]}",
         "{weight: [{filter: layernorm, value: 2.0}]}",
         "{weight: {filter: '*', value: [0.6, 0.2]}}"]),
    "ties_filter_density": ("ties", "parameters: {density: 0.6}",
                            ["{weight: 1.0, density: [{filter: mlp, value: 0.3}]}",
                             "{weight: 0.6, density: [{filter: q_proj, value: [0.1, 0.9]}, {value: 0.5}]}",
                             "{weight: 1.4}"]),
    "sce_gradient": ("sce", "parameters: {select_topk: [0.3, 0.9]}", ["{}", "{}", "{}"]),
    "breadcrumbs_gradient": ("breadcrumbs", "parameters: {density: [0.9, 0.6], gamma: [0.0, 0.1]}",
                             ["{weight: 1.0}", "{weight: [0.5, 1.5]}", "{weight: 0.8}"]),
}


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """Four layers: t = 0, 1/3, 2/3, 1, so gradients of two, three and four values interpolate between entries."""
    return write_llama_family(tmp_path_factory.mktemp("llama4"), llama_config(layers=4), n_experts=3,
                              delta_density=0.3, dtype=torch.float32)


def _feature_recipe(feature, base, experts) -> str:
    method, shared, per_model = FEATURES[feature]
    models = "\n".join(f"  - model: {e}\n    parameters: {p}" for e, p in zip(experts, per_model))
    return (f"merge_method: {method}\n" + ("" if method == "linear" else f"base_model: {base}\n")
            + f"dtype: float32\n{shared}\nmodels:\n{models}\n")


@pytest.fixture(scope="module")
def mk_features(tmp_path_factory, deep_family):
    base, experts = deep_family
    return mergekit_outputs(tmp_path_factory.mktemp("mk_features"),
                            {f: _feature_recipe(f, base, experts) for f in FEATURES})


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_parameters_varying_over_the_model_as_mergekit(tmp_path, mk_features, feature):
    recipe, mk = mk_features[feature]
    theirs, ours_ = Expert(mk), Expert(ours(tmp_path, recipe))
    assert sorted(theirs.names()) == sorted(ours_.names())
    worst = 0.0
    for name in ours_.names():
        a, b = ours_.tensor(name), theirs.tensor(name)
        worst = max(worst, float(((a - b).abs() / b.abs().clamp(min=1e-3)).max()))
    assert worst <= 1e-5, f"{feature}: largest relative difference {worst}"


def test_della_draws_the_same_distribution_as_mergekit(tmp_path, deep_family):
    """mergekit's DELLA draws from torch's global generator in its task order, ours per (seed, tensor, expert): the
    samples differ, so the same recipe is compared by what the distribution fixes. One expert, della_linear: each
    tensor keeps about ``density`` of the expert's changed entries in both, and the L1 rescale gives both the task
    vector's L1 norm exactly."""
    base, experts = deep_family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: della_linear\nbase_model: {base}\ndtype: float32\n"
                      f"parameters: {{density: 0.4, epsilon: 0.2}}\nmodels:\n"
                      f"  - model: {experts[0]}\n    parameters: {{weight: 1.0}}\n")
    reference_runs(Path(MERGEKIT).with_name("python"), MERGEKIT_YAML_MAIN,
                   [[recipe, tmp_path / "mk", "--quiet", "--random-seed", "7"]], tmp_path)
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    theirs, ours, b, e = (Expert(p) for p in (tmp_path / "mk", tmp_path / "lm", base, experts[0]))
    kept_mk = kept_lm = changed = 0
    for name in ours.names():
        tau = e.tensor(name) - b.tensor(name)
        if int(torch.count_nonzero(tau)) < 100:
            continue
        mk, lm = theirs.tensor(name) - b.tensor(name), ours.tensor(name) - b.tensor(name)
        for got in (mk, lm):
            torch.testing.assert_close(got.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=1e-6)
        assert not torch.equal(mk, lm)  # another sample
        kept_mk += int(torch.count_nonzero(mk))
        kept_lm += int(torch.count_nonzero(lm))
        changed += int(torch.count_nonzero(tau))
    # zeros rank lowest, so the changed entries sit in the upper ranks: both keep the same expected share of them
    assert abs(kept_mk - kept_lm) / changed < 0.02, (kept_mk, kept_lm, changed)
