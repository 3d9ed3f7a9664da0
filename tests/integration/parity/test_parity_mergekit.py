"""Parity with mergekit on the same inputs (runs when a mergekit install is found; mergekit is only a reference).

Point ``MERGEKIT_YAML`` at a ``mergekit-yaml`` executable (``.ci/run`` installs one in ``.venv-mergekit``).
"""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

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
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    # float32 storage: no two task-vector entries share a magnitude. With bf16 storage many do, and at such ties
    # mergekit's pick follows torch's unstable argsort while ours keeps the lower flat index (docs/strategies.md).
    return write_llama_family(root, llama_config(), n_experts=3, delta_density=0.3, dtype=torch.float32)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_result_as_mergekit(tmp_path, family, method):
    base, experts = family
    shared, per_model = METHODS[method]
    mk_method = "ties" if method == "ties_normalize_false" else method
    weights = ["1.0", "0.6", "1.4"]
    models = "\n".join(f"  - model: {e}\n    parameters: {per_model % w}" for e, w in zip(experts, weights))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        merge_method: {mk_method}
        {"" if method == "linear" else f"base_model: {base}"}
        dtype: float32
        {shared}
        models:
        """)
        + models
        + "\n"
    )
    subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk"), "--quiet"], check=True, capture_output=True)
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    theirs, ours = Expert(tmp_path / "mk"), Expert(tmp_path / "lm")
    assert sorted(theirs.names()) == sorted(ours.names())
    worst = 0.0
    for name in ours.names():
        a, b = ours.tensor(name), theirs.tensor(name)
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


def _relative_error(ours: Expert, theirs: Expert) -> float:
    """The largest difference of any tensor, relative to that tensor's largest magnitude."""
    assert sorted(theirs.names()) == sorted(ours.names())
    worst = 0.0
    for name in ours.names():
        a, b = ours.tensor(name), theirs.tensor(name)
        assert a.dtype == b.dtype == torch.float32, name
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("case", sorted(GEOMETRIC))
def test_geometric_methods_give_mergekits_model(tmp_path, family, case):
    """slerp, nuslerp, multislerp, karcher, model_stock, nearswap and arcee_fusion: mergekit 0.1.5's model, float32,
    to 1e-5 relative, from the same recipe file."""
    base, experts = family
    with_base, weights, shared = GEOMETRIC[case]
    method = case.split("_")[0] if case.split("_")[0] not in ("model", "arcee") else "_".join(case.split("_")[:2])
    lines, chosen = [], iter(experts)
    for w in weights:
        model = base if w == "base" else next(chosen)
        params = "" if w in (None, "base") else f"\n    parameters: {{weight: {w}}}"
        lines.append(f"  - model: {model}{params}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: {method}\n" + (f"base_model: {base}\n" if with_base else "")
                      + f"dtype: float32\n{shared}\nmodels:\n" + "\n".join(lines) + "\n")
    subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk"), "--quiet"], check=True, capture_output=True)
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    worst = _relative_error(Expert(tmp_path / "lm"), Expert(tmp_path / "mk"))
    print(f"{case}: max relative difference {worst:.2e}")
    assert worst <= 1e-5, f"{case}: largest relative difference {worst}"
