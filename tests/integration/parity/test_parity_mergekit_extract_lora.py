"""Parity of ``lightning-merge extract-lora`` with ``mergekit-extract-lora`` (mergekit 0.1.5, in its own
environment) on a tiny float32 Llama and its fine-tune, option by option (issue 31).

Compared: the base with each adapter applied through PEFT (``merge_and_unload``), the modules factored and their
ranks (from the factors' shapes), the modules saved whole, and the factors themselves. An SVD's singular vectors
are unique up to sign where the singular values are distinct (those of a random ΔW are), so the factors are compared
after aligning the sign of each rank-1 term; their row norms (√σ, or σ without distributed scale) need no alignment.

The two configs name modules differently: mergekit's ``target_modules`` and ``modules_to_save`` are last components
(``q_proj``, ``input_layernorm``: PEFT wraps every module so named, an excluded one included, with a zero LoRA),
ours are full module names (exactly the modules the adapter holds); the comparison is of the modules each file holds.
Point ``MERGEKIT_YAML`` at a ``mergekit-yaml`` executable; ``mergekit-extract-lora`` is beside it.
"""

import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, reference_runs
from safetensors.torch import load_file

from lightning_merge import Expert
from lightning_merge.cli.commands import main
from lightning_merge.tools.testing import llama_config, write_llama_family

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _extract_lora_binary():
    import shutil

    for yaml in (os.environ.get("MERGEKIT_YAML"), shutil.which("mergekit-yaml"),
                 str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")):
        if yaml and Path(yaml).exists() and (Path(yaml).parent / "mergekit-extract-lora").exists():
            return Path(yaml).parent / "mergekit-extract-lora"
    return None


MERGEKIT = _extract_lora_binary()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (set MERGEKIT_YAML)")]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 2-layer float32 Llama (hidden 64, vocab 256) and a fine-tune that moved every tensor (30% of entries)."""
    root = tmp_path_factory.mktemp("llama").resolve()  # absolute: mergekit takes a relative path for a Hub id
    base, (ft,) = write_llama_family(root, llama_config(), n_experts=1, delta_density=0.3, dtype=torch.float32)
    return base, ft


#: mergekit-extract-lora's entry point, run in the test process's mergekit process (conftest.reference_runs)
EXTRACT_LORA = """
from mergekit.scripts.extract_lora import main
main(standalone_mode=False)
"""


def _both(tmp_path, pair, *options):
    base, ft = pair
    mine, theirs = tmp_path / "mine", tmp_path / "mergekit"
    assert main(["extract-lora", str(ft), str(mine), "--base", str(base), *options]) == 0
    reference_runs(MERGEKIT.with_name("python"), EXTRACT_LORA,
                   [["--model", ft, "--base-model", base, "--out-path", theirs, *options]], tmp_path)
    return mine, theirs


def _factors(adapter):
    """module -> (A, B) of every factored module, and the modules saved whole."""
    tensors = load_file(Path(adapter) / "adapter_model.safetensors")
    factors, whole = {}, set()
    for name, t in tensors.items():
        name = name[len(PREFIX):]
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if name.endswith(a):
                module = name[:-len(a)]
                factors[module] = (t, tensors[PREFIX + module + b])
        if "lora_" not in name:
            whole.add(name.rsplit(".", 1)[0])
    return factors, whole


def _applied(base, adapter):
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _by_hand(base, adapter):
    """base + B@A for each factored module (scale lora_alpha / r = 1 in both configs; an embedding: (B@A)ᵀ), the
    fine-tune's tensor for each module saved whole."""
    weights = {n: Expert(base).tensor(n).clone() for n in Expert(base).names()}
    factors, _ = _factors(adapter)
    for module, (a, b) in factors.items():
        product = b @ a
        weights[f"{module}.weight"] += product.T if product.shape != weights[f"{module}.weight"].shape else product
    for name, t in load_file(Path(adapter) / "adapter_model.safetensors").items():
        if "lora_" not in name:
            weights[name[len(PREFIX):]] = t
    return weights


def _relative(a, b):
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)


def _same_model(base, mine, theirs, peft_loads_theirs=True):
    """The base with our adapter applied by PEFT, and with mergekit's (by PEFT where its config lets PEFT load it,
    else by hand), to 1e-5 relative; ours by PEFT equal to ours by hand."""
    ours = _applied(base, mine)
    assert _relative(ours, _by_hand(base, mine)) <= 1e-6
    worst = _relative(ours, _applied(base, theirs) if peft_loads_theirs else _by_hand(base, theirs))
    assert worst <= 1e-5
    return worst


def _same_factors(pair, mine, theirs):
    """Both adapters hold the same modules at the same ranks; B@A and the factors agree with mergekit's.

    How closely two float32 SVDs agree depends on the singular value gaps (float32 rounding ε ≈ 1e-7, divided by the
    gap relative to σ₁): B@A at rank k on the gap σ_k − σ_{k+1}, row i of A and column i of B on the gaps to σᵢ's
    neighbours. Ours is held to the float64 truncated SVD at 1e-5; with mergekit, to a few ε over the gap
    (5e-7/gap for B@A, 1e-6/gap for a factor's row), at least 1e-5.
    """
    (fm, wm), (ft, wt) = _factors(mine), _factors(theirs)
    assert set(fm) == set(ft) and wm == wt
    assert {m: a.shape[0] for m, (a, _) in fm.items()} == {m: a.shape[0] for m, (a, _) in ft.items()}
    base, tuned = Expert(pair[0]), Expert(pair[1])
    product = factor = exact = 0.0
    for module, (a, b) in fm.items():
        ta, tb = ft[module]
        delta = (tuned.float32(f"{module}.weight") - base.float32(f"{module}.weight")).double()
        delta = delta.T if a.shape[1] != delta.shape[1] else delta  # an embedding: factors of ΔEᵀ
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = a.shape[0]
        truncated = (u[:, :k] * s[:k]) @ vh[:k]
        scale = float(truncated.abs().max())
        exact = max(exact, float((b @ a - truncated).abs().max()) / scale)
        padded = torch.cat([s.new_tensor([float("inf")]), s, s.new_zeros(1)])
        gap = (padded[:-1] - padded[1:]) / s[0]  # gap[i] = (σ_{i-1} − σᵢ)/σ₁: σᵢ's gap above, gap[i + 1] below
        gap_k = float(gap[k])
        diff = float((b @ a - tb @ ta).abs().max()) / scale
        assert diff <= max(1e-5, 5e-7 / gap_k), (module, diff, gap_k)
        product = max(product, diff)
        torch.testing.assert_close(a.norm(dim=1), ta.norm(dim=1), rtol=1e-5, atol=1e-7)
        sign = torch.sign((a * ta).sum(dim=1))
        rows = (a * sign[:, None] - ta).norm(dim=1) / ta.norm(dim=1)
        cols = (b * sign - tb).norm(dim=0) / tb.norm(dim=0)
        bound = (1e-6 / torch.minimum(gap[:k], gap[1:k + 1])).clamp(min=1e-5)
        assert bool((rows <= bound).all() and (cols <= bound).all()), (module, rows, cols, bound)
        factor = max(factor, float(rows.max()), float(cols.max()))
    assert exact <= 1e-5
    return fm, wm, f"B@A {product:.1e} (ours against float64: {exact:.1e}), sign-aligned factor rows {factor:.1e}"


def test_default_options(tmp_path, pair):
    """Distributed scale, embeddings and head saved whole, norms saved whole; rank 8 of full-rank changes."""
    mine, theirs = _both(tmp_path, pair, "--max-rank", "8")
    factors, whole, numbers = _same_factors(pair, mine, theirs)
    assert whole == {"model.embed_tokens", "lm_head", "model.norm"} | {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert len(factors) == 14 and {a.shape[0] for a, _ in factors.values()} == {8}
    worst = _same_model(pair[0], mine, theirs)
    print(f"default: applied models {worst:.1e}, {numbers}")


def test_embed_lora_without_distributed_scale(tmp_path, pair):
    mine, theirs = _both(tmp_path, pair, "--max-rank", "8", "--embed-lora", "--no-distribute-scale")
    factors, whole, numbers = _same_factors(pair, mine, theirs)
    assert {"model.embed_tokens", "lm_head"} <= set(factors) and factors["model.embed_tokens"][0].shape == (8, 256)
    assert "model.embed_tokens" not in whole and "lm_head" not in whole
    worst = _same_model(pair[0], mine, theirs)
    print(f"embed-lora, no distribute-scale: applied {worst:.1e}, {numbers}")


def test_sv_epsilon_exclude_and_save_module(tmp_path, pair):
    """Per-module ranks from the singular values above ε (rank_pattern), an excluded layer, o_proj and the final norm
    saved whole (mergekit 0.1.5 fails with --save-module when it has to add a module to modules_to_save itself
    (``'tuple' object has no attribute 'append'``): here --embed-lora and --skip-undecomposable spare it that)."""
    mine, theirs = _both(tmp_path, pair, "--max-rank", "64", "--sv-epsilon", "0.02", "-e", r"layers\.1\.mlp",
                         "--save-module", "o_proj", "--save-module", "norm", "--embed-lora", "--skip-undecomposable")
    factors, whole, numbers = _same_factors(pair, mine, theirs)
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    assert len(set(ranks.values())) > 2 and not any("layers.1.mlp" in m for m in ranks)
    assert whole == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "model.norm"}
    # mergekit's modules_to_save ["o_proj", "norm"]: PEFT takes "norm" for every module whose name ends so
    # (input_layernorm too), finds no tensor for those and stops with a KeyError; ours names model.norm
    worst = _same_model(pair[0], mine, theirs, peft_loads_theirs=False)
    print(f"sv-epsilon 0.02: ranks {sorted(set(ranks.values()))}; applied {worst:.1e}, {numbers}")


def test_include_and_skip_undecomposable(tmp_path, pair):
    """Only attention factored; norms skipped; embeddings and head still saved whole (include does not apply)."""
    mine, theirs = _both(tmp_path, pair, "--max-rank", "4", "-i", "self_attn", "--skip-undecomposable")
    factors, whole, _ = _same_factors(pair, mine, theirs)
    assert whole == {"model.embed_tokens", "lm_head"} and all("self_attn" in m for m in factors)
    worst = _same_model(pair[0], mine, theirs)
    target = Expert(pair[1]).tensor("model.embed_tokens.weight")
    assert torch.equal(_applied(pair[0], mine)["model.embed_tokens.weight"], target)
    print(f"include self_attn, skip-undecomposable: applied {worst:.1e}")
