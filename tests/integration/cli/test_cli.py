"""The command line: recipes (mergekit's format), errors before any tensor is merged, inspect, demo."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_models
from safetensors.torch import load_file, save_file

from lightning_merge import Cabs, Dare, Karcher, Linear, LiNeS, ModelStock, NuSlerp, Slerp, TaskArithmetic, Ties, merge
from lightning_merge.cli.commands import main
from lightning_merge.tools.recipe import RecipeError, load_recipe


@pytest.fixture
def models(tmp_path):
    base, experts = make_models(3)
    (tmp_path / "models").mkdir()
    save_file(base, tmp_path / "models" / "base.safetensors")
    for i, e in enumerate(experts):
        save_file(e, tmp_path / "models" / f"e{i}.safetensors")
    return base, experts


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


RECIPES = {
    "linear": (
        """
        merge_method: linear
        models:
          - model: models/e0.safetensors
            parameters: {weight: 1.0}
          - model: models/e1.safetensors
            parameters: {weight: 3.0}
        """,
        lambda b, e: merge(e[:2], None, Linear(weights=[1.0, 3.0])),
    ),
    "task_arithmetic": (
        """
        merge_method: task_arithmetic
        base_model: models/base.safetensors
        parameters: {lambda: 0.7}
        models:
          - model: models/base.safetensors
          - model: models/e0.safetensors
            parameters: {weight: 0.5}
          - model: models/e1.safetensors
            parameters: {weight: 1.0}
        """,
        lambda b, e: merge(e[:2], b, TaskArithmetic(weights=[0.5, 1.0], scale=0.7)),
    ),
    "ties": (
        """
        merge_method: ties
        base_model: models/base.safetensors
        parameters: {density: 0.4}
        dtype: float32
        models:
          - model: models/e0.safetensors
            parameters: {weight: 1.0}
          - model: models/e1.safetensors
            parameters: {weight: 0.5, density: 0.7}
          - model: models/e2.safetensors
            parameters: {weight: 1.0}
        """,
        lambda b, e: merge(e, b, Ties(weights=[1.0, 0.5, 1.0], density=[0.4, 0.7, 0.4])),
    ),
    "dare_ties": (
        """
        merge_method: dare_ties
        base_model: models/base.safetensors
        models:
          - model: models/e0.safetensors
            parameters: {weight: 1.0, density: 0.5}
          - model: models/e1.safetensors
            parameters: {weight: 1.0, density: 0.5}
        """,
        lambda b, e: merge(
            e[:2], b, Dare(weights=[1.0, 1.0], drop_rate=[0.5, 0.5], combine="ties", rescale="l1", normalize=False)
        ),
    ),
    "cabs": (
        """
        merge_method: cabs
        base_model: models/base.safetensors
        parameters: {n: 2, m: 8, order: [1, 0]}
        models:
          - model: models/e0.safetensors
            parameters: {weight: 1.2}
          - model: models/e1.safetensors
            parameters: {weight: 1.2}
        """,
        lambda b, e: merge(e[:2], b, Cabs(n=2, m=8, order=[1, 0], weights=[1.2, 1.2])),
    ),
    "lines": (
        """
        merge_method: lines
        base_model: models/base.safetensors
        parameters: {inner: {name: ties, density: 0.5}, beta: 0.5}
        models:
          - model: models/e0.safetensors
          - model: models/e1.safetensors
          - model: models/e2.safetensors
        """,
        lambda b, e: merge(e, b, LiNeS(Ties(density=0.5), beta=0.5)),
    ),
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_recipe_merge_equals_python_api(tmp_path, models, method):
    text, python = RECIPES[method]
    recipe = write(tmp_path, text)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    expected = python(*models)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_set_overrides_strategy_arguments(tmp_path, models):
    recipe = write(tmp_path, RECIPES["task_arithmetic"][0])
    assert load_recipe(recipe, overrides={"scale": 0.1}).strategy.scale == 0.1


@pytest.mark.parametrize(
    "text, match",
    [
        ("merge_method: frankenmerge\nmodels: [{model: models/e0.safetensors}]",
         "merge_method 'frankenmerge' is not supported"),
        ("merge_method: slerp\nbase_model: models/base.safetensors\nmodels: [{model: models/e0.safetensors}]",
         r"merge_method 'slerp' needs parameters.t \(mergekit requires it\)"),
        ("merge_method: nearswap\nbase_model: models/base.safetensors\nmodels: [{model: models/e0.safetensors}]",
         r"merge_method 'nearswap' needs parameters.t"),
        ("merge_method: nuslerp\nbase_model: models/base.safetensors\nmodels: [{model: models/e0.safetensors, "
         "parameters: {weight: 1}}, {model: models/e1.safetensors}]",
         r"models\[1\] has no 'weight' \(mergekit requires it for 'nuslerp'\)"),
        ("merge_method: slerp\nbase_model: models/base.safetensors\nparameters: {t: 0.5}\n"
         "models: [{model: models/e0.safetensors}, {model: models/e1.safetensors}]",
         r"Slerp merges exactly 1 expert \(the base not counted\), got 2; slerp interpolates"),
        ("merge_method: model_stock\nbase_model: models/base.safetensors\nparameters: {filter_wise: 1}\n"
         "models: [{model: models/e0.safetensors}, {model: models/e1.safetensors}]",
         r"parameters.filter_wise must be true or false, got 1"),
        ("merge_method: karcher\nparameters: {max_iter: 2.5}\nmodels: [{model: models/e0.safetensors}]",
         r"parameters.max_iter must be an integer, got 2.5"),
        ("merge_method: ties\nslices: []", r"'slices' must be a non-empty list"),
        ("merge_method: passthrough\nslices: [{sources: [{model: models/e0.safetensors, layer_range: [2, 1]}]}]",
         r"slices\[0\].sources\[0\].layer_range must be \[start, end\] with 0 <= start < end"),
        ("merge_method: passthrough\nslices: [{sources: [{model: models/e0.safetensors, layer_range: [0, 1]}, "
         "{model: models/e1.safetensors, layer_range: [0, 2]}]}]",
         r"slices\[0\].sources give \[1, 2\] layers"),
        ("merge_method: passthrough\nslices: [{sources: [{model: models/e0.safetensors, layer_range: [0, 1]}, "
         "{model: models/e1.safetensors, layer_range: [1, 2]}]}]",
         r"passthrough takes one source per slice"),
        ("merge_method: ties\nbase_model: models/base.safetensors\nslices: [{sources: [{model: models/e0.safetensors, "
         "layer_range: [0, 1]}]}]", r"slices\[0\]: its base model .* is not among its sources"),
        ("merge_method: passthrough\nslices: [{sources: [{model: models/e0.safetensors, layer_range: [0, 9]}]}]",
         r"layer_range \[0, 9\] goes beyond .* which has 2 layers"),
        ("merge_method: passthrough\nmodels: [{model: models/e0.safetensors}, {model: models/e1.safetensors}]",
         r"passthrough takes exactly one model and no base_model"),
        ("merge_method: linear\nchat_template: chatm\nmodels: [{model: models/e0.safetensors}]",
         r"chat_template 'chatm' is neither a template name"),
        ("merge_method: linear\nchat_template: chatml\n"
         "models: [{model: models/e0.safetensors, parameters: {weight: 1}}]",
         r"chat_template needs a tokenizer in the output, but .* has no tokenizer_config.json"),
        ("merge_method: ties\nmodules: {text: {}}\nmodels: []", "modules.text must give either 'models' or 'slices'"),
        ("merge_method: linear\ntokenizer_source: union\ntokenizer: {source: base}\n"
         "models: [{model: models/e0.safetensors}]", "either 'tokenizer_source' or 'tokenizer'"),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\nparameters: {densty: 0.5}\n"
            "models: [{model: models/e0.safetensors, parameters: {weight: 1}}]",
            "densty",
        ),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\n"
            "models: [{model: models/e0.safetensors, parameters: {weight: []}}]",
            r"models\[0\].parameters.weight is an empty list",
        ),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\n"
            "models: [{model: models/e0.safetensors, parameters: {weight: [{filter: mlp}]}}]",
            r"weight\[0\] must be a rule \{filter: TEXT, value: ...\}",
        ),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\n"
            "models: [{model: models/e0.safetensors, parameters: {weight: [{filter: bias, value: 1}]}}]",
            "has no 'weight' .*at tensor 'layers.0.weight'",
        ),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\n"
            "models: [{model: org/model-7b, parameters: {weight: 1}}]",
            "not found .*hub model ids",
        ),
        (
            "merge_method: ties\nbase_model: models/base.safetensors\nmodels: [{model: models/e0.safetensors}]",
            "has no 'weight'",
        ),
        (
            "merge_method: task_arithmetic\nmodels: [{model: models/e0.safetensors, parameters: {weight: 1}}]",
            "needs base_model",
        ),
    ],
)
def test_bad_recipes_rejected_before_merging(tmp_path, models, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("method, parameters, listed, strategy, expert_indices, with_base", [
    ("slerp", "{t: 0.3}", ["base", "e0"], Slerp(t=0.3), [0], True),
    ("nuslerp", "{nuslerp_flatten: false}", ["e0:1.0", "e1:0.5"], NuSlerp(weights=[1.0, 0.5], nuslerp_flatten=False),
     [0, 1], True),
    ("model_stock", "{filter_wise: true}", ["e0", "e1", "e2"], ModelStock(filter_wise=True), [0, 1, 2], True),
    ("karcher", "{max_iter: 3}", ["e0", "e1"], Karcher(max_iter=3), [0, 1, "base"], False),
])
def test_geometric_recipes_build_mergekits_method(tmp_path, models, method, parameters, listed, strategy,
                                                  expert_indices, with_base):
    """A mergekit recipe of a geometric method builds its strategy with mergekit's names; karcher averages the base
    with the models (mergekit adds it when it is not listed), the others merge the models other than the base."""
    lines = []
    for m in listed:
        name, _, weight = m.partition(":")
        lines.append(f"  - model: models/{name}.safetensors" + (f"\n    parameters: {{weight: {weight}}}" if weight
                                                               else ""))
    recipe = write(tmp_path, f"merge_method: {method}\nbase_model: models/base.safetensors\nparameters: {parameters}\n"
                             "models:\n" + "\n".join(lines) + "\n")
    loaded = load_recipe(recipe)
    assert loaded.strategy == strategy
    named = [f"e{i}" if i != "base" else "base" for i in expert_indices]
    assert [e.name.rsplit("/", 1)[-1] for e in loaded.experts] == [f"{n}.safetensors" for n in named]
    assert (loaded.base is not None) == (with_base or method == "karcher")
    assert main(["merge", str(recipe), str(tmp_path / "out.safetensors"), "--no-progress"]) == 0
    base, experts = models
    inputs = [base if n == "base" else experts[int(n[1:])] for n in named]
    want = merge(inputs, base, strategy)
    got = load_file(tmp_path / "out.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_mismatched_architecture_reported_before_any_output(tmp_path, models, capsys):
    base, experts = models
    bad = dict(experts[0], **{"layers.0.weight": torch.zeros(3, 3)})
    save_file(bad, tmp_path / "models" / "bad.safetensors")
    recipe = write(
        tmp_path,
        """
        merge_method: task_arithmetic
        base_model: models/base.safetensors
        models:
          - {model: models/e0.safetensors, parameters: {weight: 1}}
          - {model: models/bad.safetensors, parameters: {weight: 1}}
        """,
    )
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_reports_counts(tmp_path, models, capsys):
    assert main(["inspect", str(tmp_path / "models" / "base.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == 4 and info["parameters"] == 16 * 8 + 16 + 4 * 16 + 5
    assert info["dtypes"] == {"float32": 3, "int64": 1} and info["statistics"] == {}


@pytest.mark.slow
def test_cli_merge_path_imports_no_lightning(tmp_path, models):
    recipe = write(tmp_path, RECIPES["ties"][0])
    code = (
        "import sys; from lightning_merge.cli.commands import main; "
        f"rc = main(['merge', {str(recipe)!r}, {str(tmp_path / 'o')!r}, '--no-progress']); "
        "heavy = [m for m in ('lightning', 'transformers', 'peft') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"


@pytest.mark.slow
def test_demo_runs_and_reports_normalized_accuracy(capsys):
    from lightning_merge.cli.demo import TASKS, run_demo

    results = run_demo(quick=True)
    assert results["experts (own task)"]["normalized"] == 1.0
    for method in (
        "average",
        "task_arithmetic",
        "ties",
        "dare",
        "breadcrumbs",
        "cabs",
        "consensus",
        "fisher",
        "ota",
        "ota_ffg",
        "weighted_median",
    ):
        row = results[method]
        assert 0.0 < row["normalized"] <= 1.2
        assert all(0.0 <= row[t.name] <= 1.0 for t in TASKS)
    out = capsys.readouterr().out
    assert "normalized" in out and "task_arithmetic" in out


def test_recipe_with_a_curvature_strategy_reads_the_sidecars(tmp_path):
    from safetensors.torch import save_file

    from lightning_merge import Expert, Fisher, merge
    from lightning_merge.cli.commands import main
    from lightning_merge.formats.sidecar import write_statistics

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(2):
        save_file({"w": base["w"] + torch.randn(4, 3, generator=g)}, str(tmp_path / f"e{i}.safetensors"))
        write_statistics(
            tmp_path / f"e{i}.statistics.safetensors",
            {"fisher.batch": {"w": torch.rand(4, 3, generator=g)}},
            {"fisher.batch": {"count": 10, "batch_size": 8}},
        )
    (tmp_path / "r.yaml").write_text(
        "merge_method: fisher\nbase_model: base.safetensors\nparameters: {scale: 1.3}\n"
        "models:\n  - model: e0.safetensors\n  - model: e1.safetensors\n"
    )
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out.safetensors"), "--no-progress"]) == 0
    expected = merge(
        [Expert(tmp_path / "e0.safetensors"), Expert(tmp_path / "e1.safetensors")],
        base=base,
        strategy=Fisher(scale=1.3),
    )
    torch.testing.assert_close(Expert(tmp_path / "out.safetensors").tensor("w"), expected["w"])
