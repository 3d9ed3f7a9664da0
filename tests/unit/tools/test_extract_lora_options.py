"""The options of ``extract-lora`` that mergekit-extract-lora has (issue 31): each one's semantics on small tensors,
against the SVD computed directly (float64) and the module rules of mergekit 0.1.5's ``plan_extraction``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge.cli.commands import main
from lightning_merge.tools.extract_lora import extract_lora, factor_module, weight_kind


def _with_singular_values(rows, cols, values, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def _truncated(m, k):
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_distributed_scale_splits_sigma_evenly():
    delta = _with_singular_values(12, 9, [4.0, 3.0, 2.0, 1.0, 0.5])
    a, b, error = factor_module(delta.float(), 3)
    assert a.shape == (3, 9) and b.shape == (12, 3)
    torch.testing.assert_close(a.norm(dim=1).double(), torch.tensor([2.0, 3.0, 4.0]).sqrt().flip(0).double(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(b.norm(dim=0).double(), a.norm(dim=1).double(), rtol=1e-5, atol=0)
    torch.testing.assert_close((b @ a).double(), _truncated(delta, 3), rtol=0, atol=1e-5)
    assert error == pytest.approx((1.0 + 0.25) ** 0.5 / (16 + 9 + 4 + 1 + 0.25) ** 0.5, rel=1e-4)


def test_undistributed_scale_puts_sigma_in_a():
    delta = _with_singular_values(12, 9, [4.0, 3.0, 2.0, 1.0, 0.5])
    a, b, _ = factor_module(delta.float(), 3, distribute_scale=False)
    torch.testing.assert_close(a.norm(dim=1).double(), torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close((b.T @ b).double(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)  # B = U
    torch.testing.assert_close((b @ a).double(), _truncated(delta, 3), rtol=0, atol=1e-5)


def test_sv_epsilon_keeps_singular_values_above_it():
    delta = _with_singular_values(10, 10, [3.0, 2.0, 1.0, 0.5]).float()
    assert factor_module(delta, 8, sv_epsilon=1.001)[0].shape[0] == 2  # σ = 3, 2 are above it
    assert factor_module(delta, 8, sv_epsilon=0.999)[0].shape[0] == 3
    assert factor_module(delta, 2, sv_epsilon=0.1)[0].shape[0] == 2  # and never above the rank asked for
    assert factor_module(delta, 8)[0].shape[0] == 8  # 0: every singular value up to the rank, zeros included
    a, b, error = factor_module(delta, 8, sv_epsilon=3.5)
    assert a.shape == (0, 10) and b.shape == (10, 0) and error == pytest.approx(1.0)
    a, b, error = factor_module(delta, 8, sv_epsilon=0.9)
    assert error == pytest.approx(0.5 / (9 + 4 + 1 + 0.25) ** 0.5, rel=1e-4)


def test_an_embedding_is_factored_transposed():
    delta = _with_singular_values(30, 6, [2.0, 1.0]).float()  # (vocab, dim)
    a, b, _ = factor_module(delta, 4, transpose=True)
    assert a.shape == (4, 30) and b.shape == (6, 4)  # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
    torch.testing.assert_close((b @ a).T.double(), delta.double(), rtol=0, atol=1e-5)  # PEFT: (B A)ᵀ


def test_weight_kinds():
    assert weight_kind("model.embed_tokens.weight", (50, 8), 50) == "embedding"
    assert weight_kind("transformer.wte.weight", (50, 8), None) == "embedding"
    assert weight_kind("lm_head.weight", (50, 8), 50) == "head"
    assert weight_kind("output.weight", (50, 8), 50) == "head"  # rows = the config's vocab_size
    assert weight_kind("model.layers.0.self_attn.q_proj.weight", (8, 8), 50) == "linear"
    assert weight_kind("model.norm.weight", (8,), 50) == "other"
    assert weight_kind("model.layers.0.self_attn.q_proj.bias", (8,), 50) == "other"
    assert weight_kind("model.conv.weight", (8, 4, 3, 3), 50) == "other"


VOCAB, DIM = 20, 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a fine-tune where every tensor changed: embeddings, two layers of q/k projections (q with a bias),
    norms and a head."""
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}
    for i in range(2):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (DIM, DIM)
        shapes[f"model.layers.{i}.self_attn.q_proj.bias"] = (DIM,)
        shapes[f"model.layers.{i}.self_attn.k_proj.weight"] = (4, DIM)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (DIM,)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    ft["model.layers.1.self_attn.q_proj.bias"] = base["model.layers.1.self_attn.q_proj.bias"].clone()
    ft["model.layers.0.self_attn.q_proj.bias"] = base["model.layers.0.self_attn.q_proj.bias"].clone()
    for name, sd in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
        (root / name / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return root / "base", root / "ft", base, ft


def _read(out):
    return json.loads((out / "adapter_config.json").read_text()), load_file(out / "adapter_model.safetensors")


def _saved_whole(tensors):
    return sorted({n[len("base_model.model."):].rsplit(".", 1)[0] for n in tensors if "lora_" not in n})


def test_defaults_save_embeddings_heads_and_norms_whole(tmp_path, pair):
    base, ft, _, _ = pair
    done = extract_lora(ft, base, tmp_path / "x")
    config, tensors = _read(tmp_path / "x")
    linears = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "q_proj")]
    assert config["target_modules"] == sorted(linears)
    norms = ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    assert config["modules_to_save"] == sorted(["lm_head", "model.embed_tokens"] + norms) == _saved_whole(tensors)
    assert done.ranks == {m: (4 if "k_proj" in m else 8) for m in linears}  # the default rank, 128, capped
    assert config["r"] == 8 and config["rank_pattern"] == {"model\\.layers\\.0\\.self_attn\\.k_proj": 4,
                                                           "model\\.layers\\.1\\.self_attn\\.k_proj": 4}


def test_embed_lora_factors_the_embedding_and_the_head(tmp_path, pair):
    base, ft, b, f = pair
    extract_lora(ft, base, tmp_path / "x", 8, embed_lora=True)
    config, tensors = _read(tmp_path / "x")
    assert {"model.embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert "model.embed_tokens" not in _saved_whole(tensors) and "lm_head" not in _saved_whole(tensors)
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    e = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert a.shape == (8, VOCAB) and e.shape == (DIM, 8)
    delta = f["model.embed_tokens.weight"] - b["model.embed_tokens.weight"]
    torch.testing.assert_close((e @ a).T, delta, rtol=0, atol=1e-5)
    head = tensors["base_model.model.lm_head.lora_B.weight"] @ tensors["base_model.model.lm_head.lora_A.weight"]
    torch.testing.assert_close(head, f["lm_head.weight"] - b["lm_head.weight"], rtol=0, atol=1e-5)


def test_save_module_by_key_or_full_name(tmp_path, pair):
    base, ft, _, f = pair
    extract_lora(ft, base, tmp_path / "x", 8, save_modules=["k_proj", "model.layers.0.self_attn.q_proj"])
    config, tensors = _read(tmp_path / "x")
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.0.self_attn.q_proj"} <= set(config["modules_to_save"])
    # saved whole even where unchanged (the bias of layer 0's q_proj)
    assert torch.equal(tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"],
                       f["model.layers.0.self_attn.q_proj.bias"])
    with pytest.raises(ValueError, match="save module 'v_proj' names no module"):
        extract_lora(ft, base, tmp_path / "y", 8, save_modules=["v_proj"])


def test_exclude_and_include(tmp_path, pair):
    base, ft, _, _ = pair
    extract_lora(ft, base, tmp_path / "x", 8, exclude=[r"layers\.1\.", "embed"])
    config, tensors = _read(tmp_path / "x")
    assert config["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    # an excluded embedding is not saved; the head, not excluded, is
    assert _saved_whole(tensors) == ["lm_head", "model.layers.0.input_layernorm", "model.norm"]
    extract_lora(ft, base, tmp_path / "y", 8, include=["k_proj"])
    config, tensors = _read(tmp_path / "y")
    assert config["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    # include does not apply to embeddings and heads saved whole (as in mergekit): norms are left out
    assert _saved_whole(tensors) == ["lm_head", "model.embed_tokens"]
    extract_lora(ft, base, tmp_path / "z", 8, include=["k_proj"], embed_lora=True)
    config, tensors = _read(tmp_path / "z")
    assert _saved_whole(tensors) == [] and len(config["target_modules"]) == 2  # with embed_lora, include applies
    with pytest.raises(ValueError, match=r"exclude regex '\(' is not a regular expression"):
        extract_lora(ft, base, tmp_path / "w", 8, exclude=["("])


def test_skip_undecomposable(tmp_path, pair):
    base, ft, _, _ = pair
    extract_lora(ft, base, tmp_path / "x", 8, skip_undecomposable=True)
    config, tensors = _read(tmp_path / "x")
    assert _saved_whole(tensors) == ["lm_head", "model.embed_tokens"]  # norms left out; embeddings still saved
    assert len(config["target_modules"]) == 4


def test_a_linear_module_whose_bias_changed_is_saved_whole(tmp_path, pair):
    base, ft, b, f = pair
    f = dict(f)
    f["model.layers.1.self_attn.q_proj.bias"] = f["model.layers.1.self_attn.q_proj.bias"] + 1.0
    save_file(f, tmp_path / "ft.safetensors")
    save_file(b, tmp_path / "base.safetensors")
    extract_lora(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", tmp_path / "x", 8)
    config, tensors = _read(tmp_path / "x")
    assert "model.layers.1.self_attn.q_proj" in config["modules_to_save"]
    assert "model.layers.1.self_attn.q_proj" not in config["target_modules"]
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]  # its bias did not change


def test_sv_epsilon_gives_per_module_ranks_and_drops_empty_modules(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"a.q_proj.weight": torch.randn(10, 10, generator=g), "a.k_proj.weight": torch.randn(10, 10, generator=g),
            "a.v_proj.weight": torch.randn(10, 10, generator=g)}
    ft = {"a.q_proj.weight": base["a.q_proj.weight"] + _with_singular_values(10, 10, [3.0, 2.0, 1.0]).float(),
          "a.k_proj.weight": base["a.k_proj.weight"] + _with_singular_values(10, 10, [0.5, 0.4], seed=1).float(),
          "a.v_proj.weight": base["a.v_proj.weight"] + _with_singular_values(10, 10, [5.0, 0.2], seed=2).float()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    done = extract_lora(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", tmp_path / "x", 8,
                        sv_epsilon=0.45)
    config, tensors = _read(tmp_path / "x")
    assert done.ranks == {"a.q_proj": 3, "a.k_proj": 1, "a.v_proj": 1}
    assert config["r"] == 3 and config["rank_pattern"] == config["alpha_pattern"] == {r"a\.k_proj": 1,
                                                                                        r"a\.v_proj": 1}
    assert tensors["base_model.model.a.k_proj.lora_A.weight"].shape == (1, 10)
    done = extract_lora(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", tmp_path / "y", 8,
                        sv_epsilon=0.6)
    config, _ = _read(tmp_path / "y")
    assert config["target_modules"] == ["a.q_proj", "a.v_proj"]  # k_proj: nothing above 0.6, dropped
    assert json.loads((tmp_path / "y" / "lightning_merge.json").read_text())["dropped"] == ["a.k_proj"]
    with pytest.raises(ValueError, match="sv_epsilon must be a number >= 0"):
        extract_lora(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", tmp_path / "z", 8, sv_epsilon=-1)


def test_the_cli_takes_mergekit_spellings(tmp_path, pair):
    base, ft, _, _ = pair
    assert main(["extract-lora", str(ft), str(tmp_path / "x"), "--base-model", str(base), "--max-rank", "2",
                 "--no-distribute-scale", "--embed-lora", "--save-module", "norm", "-e", "layers\\.1\\.",
                 "-i", "layers|embed|lm_head|norm", "--sv-epsilon", "0.01", "--skip-undecomposable"]) == 0
    config, tensors = _read(tmp_path / "x")
    assert config["r"] == 2
    assert config["target_modules"] == ["lm_head", "model.embed_tokens", "model.layers.0.self_attn.k_proj",
                                        "model.layers.0.self_attn.q_proj"]
    assert _saved_whole(tensors) == ["model.norm"]  # layer 0's norm: undecomposable, skipped
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(a.T @ a, torch.eye(2), rtol=0, atol=1e-5)  # no distributed scale: B = U
    record = json.loads((tmp_path / "x" / "lightning_merge.json").read_text())
    assert record["distribute_scale"] is False and record["sv_epsilon"] == 0.01
