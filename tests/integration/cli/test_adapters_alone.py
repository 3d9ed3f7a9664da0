"""A recipe that lists adapter folders alone takes the base they name (docs/lora.md): the same merge as the recipe
that names the base, and a clear refusal when the adapters name none or different ones."""

import json

import pytest
from conftest import write_lora_family
from safetensors.torch import load_file

from lightning_merge.cli.commands import main


def _recipe(path, adapters, base=None, method="task_arithmetic"):
    lines = [f"merge_method: {method}", "parameters: {lambda: 0.7}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    lines += [f"  - model: {a}\n    parameters: {{weight: 1.0}}" for a in adapters]
    path.write_text("\n".join(lines) + "\n")
    return path


def _name_base(adapter, base):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None if base is None else str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_adapters_alone_merge_over_the_base_they_name(tmp_path):
    base, adapters = write_lora_family(tmp_path / "family", n=2)
    for a in adapters:
        _name_base(a, base)
    named = _recipe(tmp_path / "named.yaml", adapters, base=base)
    alone = _recipe(tmp_path / "alone.yaml", adapters)
    assert main(["merge", str(named), str(tmp_path / "named"), "--no-progress"]) == 0
    assert main(["merge", str(alone), str(tmp_path / "alone"), "--no-progress"]) == 0
    want = {k: v for f in sorted((tmp_path / "named").glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted((tmp_path / "alone").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert want.keys() == got.keys() and len(want) > 0
    base_weights = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
    assert any(not got[k].equal(base_weights[k]) for k in got)  # the adapters moved something
    for k in want:
        assert got[k].equal(want[k]), k


@pytest.mark.parametrize("case", ["none named", "different bases"])
def test_adapters_alone_without_one_named_base_are_refused_saying_what_to_add(tmp_path, case, capsys):
    base, adapters = write_lora_family(tmp_path / "family", n=2)
    other = tmp_path / "other-base"
    other.mkdir()
    _name_base(adapters[0], None if case == "none named" else base)
    _name_base(adapters[1], None if case == "none named" else other)
    recipe = _recipe(tmp_path / "alone.yaml", adapters)
    assert main(["merge", str(recipe), str(tmp_path / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs base_model" in err and "all adapters take the base they name" in err
    assert not (tmp_path / "never").exists()
