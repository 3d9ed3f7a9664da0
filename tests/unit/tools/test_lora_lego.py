"""LoRA-LEGO (lightning_merge.tools.lora_lego) against its equations: units clustered by a seeded k-means, each
centroid rescaled to its members' mean norm (parameter reweighting), ΔW scaled by √(r̄/k) (output reweighting); on
hand-built units whose clusters are known, at k = the total rank (the concatenation's ΔW over √N), on identical
adapters (the adapter itself), and through PEFT (the written folder loads and gives the function computed here)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_merge.errors import AdapterError
from lightning_merge.tools.lora_lego import kmeans, lego_factors, merge_lora_lego


def test_kmeans_finds_separated_clusters_and_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    points = centres[truth] + 0.1 * torch.randn(60, 3, generator=g)
    labels, centroids = kmeans(points, 3, seed=5)
    # the same partition as the truth (cluster numbers may differ): labels are a relabelling of truth
    assert len({(int(t), int(c)) for t, c in zip(truth, labels)}) == 3
    for c in range(3):
        torch.testing.assert_close(centroids[c], points[labels == c].double().mean(0))
    again = kmeans(points, 3, seed=5)
    assert torch.equal(again[0], labels) and torch.equal(again[1], centroids)
    # k = n: every point its own cluster
    labels, centroids = kmeans(points[:7], 7, seed=1)
    assert sorted(labels.tolist()) == list(range(7))
    torch.testing.assert_close(centroids[labels], points[:7].double())
    with pytest.raises(ValueError, match="1 <= k <= the number of points"):
        kmeans(points[:4], 5)


def _unit(a, b):
    return torch.cat([torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)])


def test_hand_built_units_give_the_papers_centroids_and_reweighting():
    # adapter 1 (s = 2): units (a, b) = ([1,0,0], [1,0,0,0]) and ([0,1,0], [0,1,0,0]);
    # adapter 2 (s = 0.5): units ([0,2.2,0], [0,2.4,0,0]) and ([1.8,0,0], [2.0,0,0,0]): with √s folded in, unit 0 of
    # adapter 1 sits near unit 1 of adapter 2, unit 1 near unit 0: clusters {0, 3} and {1, 2}
    a1 = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    b1 = torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]])
    a2 = torch.tensor([[0, 2.2, 0], [1.8, 0, 0]])
    b2 = torch.tensor([[0, 2.0], [2.4, 0], [0, 0], [0, 0]])
    units = [_unit(a1[0], b1[:, 0]) * math.sqrt(2), _unit(a1[1], b1[:, 1]) * math.sqrt(2),
             _unit(a2[0], b2[:, 0]) * math.sqrt(0.5), _unit(a2[1], b2[:, 1]) * math.sqrt(0.5)]
    merged = lego_factors([(a1, b1, 2.0), (a2, b2, 0.5)], 2, seed=0)
    assert merged.labels.tolist() == [0, 1, 1, 0] and merged.sizes == [2, 2]
    for c, members in enumerate(([0, 3], [1, 2])):
        mu = (units[members[0]] + units[members[1]]) / 2
        scale = (units[members[0]].norm() + units[members[1]].norm()) / 2 / mu.norm()  # mean ‖u‖ / ‖μ‖
        assert float(merged.parameter_scales[c]) == pytest.approx(float(scale), rel=1e-12)
        expected = mu * scale * math.sqrt(4 / 2 / 2)  # output reweighting √(r̄/k) = √(2/2) on B only
        torch.testing.assert_close(merged.a[c].double(), expected[:3].float().double())
        torch.testing.assert_close(merged.b[:, c].double(), expected[3:].float().double())
    # without the reweightings: the plain centroids; at k = 1 with output reweighting: √(2/1) on B
    plain = lego_factors([(a1, b1, 2.0), (a2, b2, 0.5)], 2, seed=0, reweight_parameters=False,
                         reweight_output=False)
    mu = (units[0] + units[3]) / 2
    torch.testing.assert_close(plain.a[0].double(), mu[:3].float().double())
    assert plain.output_scale == 1.0 and torch.equal(plain.parameter_scales, torch.ones(2, dtype=torch.float64))
    one = lego_factors([(a1, b1, 2.0), (a2, b2, 0.5)], 1, seed=0, reweight_parameters=False)
    assert one.output_scale == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(one.b[:, 0].double(), (sum(units)[3:] / 4 * math.sqrt(2)).float().double())


def test_rank_equal_to_all_units_is_the_concatenation_over_root_n():
    g = torch.Generator().manual_seed(0)
    for ranks in ((4, 4, 4), (2, 4)):  # equal ranks, and heterogeneous ones (r̄ = 3)
        factors = [(torch.randn(r, 10, generator=g), torch.randn(7, r, generator=g), 0.3 + i) for i, r in
                   enumerate(ranks)]
        concatenation = sum(s * b.double() @ a.double() for a, b, s in factors)
        total = sum(ranks)
        merged = lego_factors(factors, total, seed=3)
        assert merged.sizes == [1] * total and torch.allclose(merged.parameter_scales, torch.ones(total).double())
        scale = math.sqrt(total / len(ranks) / total)  # √(r̄/k) = 1/√N
        torch.testing.assert_close((merged.b @ merged.a).double(), concatenation * scale, rtol=1e-5, atol=1e-5)
        exact = lego_factors(factors, total, seed=3, reweight_output=False)
        torch.testing.assert_close((exact.b @ exact.a).double(), concatenation, rtol=1e-5, atol=1e-5)


def test_convolution_factors_keep_their_layout():
    g = torch.Generator().manual_seed(2)
    factors = [(torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g), 1.0) for _ in range(2)]
    merged = lego_factors(factors, 4, seed=0, reweight_output=False)
    assert merged.a.shape == (4, 3, 3, 3) and merged.b.shape == (5, 4, 1, 1)
    delta = lambda a, b: b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)  # noqa: E731
    torch.testing.assert_close(delta(merged.a, merged.b), sum(delta(a, b) for a, b, _ in factors), rtol=1e-5,
                               atol=1e-5)


def test_identical_adapters_merge_into_the_adapter_and_seeds_are_deterministic():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g)
    merged = lego_factors([(a, b, 1.5)] * 3, 4, seed=7)
    assert merged.sizes == [3, 3, 3, 3]
    torch.testing.assert_close(merged.b @ merged.a, 1.5 * b @ a, rtol=1e-5, atol=1e-6)
    factors = [(torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g), 1.0) for _ in range(3)]
    first, second = lego_factors(factors, 5, seed=11), lego_factors(factors, 5, seed=11)
    assert torch.equal(first.a, second.a) and torch.equal(first.b, second.b)
    assert torch.equal(first.labels, second.labels)


def test_refusals_name_the_module_and_ranks():
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"module 'q'.*number of units there, 4 \(the adapters' ranks 2, 2"):
        lego_factors([(a, b, 1.0), (a, b, 1.0)], 5, where="module 'q'")
    with pytest.raises(ValueError, match="do not fit"):
        lego_factors([(a, b, 1.0), (torch.ones(2, 5), torch.ones(4, 2), 1.0)], 2)


# ---- adapter folders through PEFT ---------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lego")
    tiny_llama().save_pretrained(root / "base")
    configs = {
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "b": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "c": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False),
    }
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(tiny_llama(), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.2)
        model.save_pretrained(root / name)
    return root


def _deltas(root, name):
    model = peft.PeftModel.from_pretrained(tiny_llama(), root / name)
    merged = model.merge_and_unload().state_dict()
    base = tiny_llama().state_dict()
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


def test_written_adapter_loads_in_peft_and_gives_the_merged_function(family, tmp_path):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    # k = the total rank (4 + 2): the concatenation's ΔW over √2, checked through PEFT against the adapters' own ΔW
    result = merge_lora_lego([family / "a", family / "b"], tmp_path / "all", rank=6, base=family / "base")
    config = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and config["rank_pattern"] == {}
    assert result.modules["model.layers.0.self_attn.q_proj"]["cluster_sizes"] == [1] * 6
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all").eval()
    da, db = _deltas(family, "a"), _deltas(family, "b")
    state = tiny_llama().state_dict()
    expected = tiny_llama()
    expected.load_state_dict({k: v + (da.get(k, 0) + db.get(k, 0)) * math.sqrt(3 / 6) for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-5)
    # k = 3: the folder holds lego_factors' factors, module by module, with scaling 1
    merge_lora_lego([family / "a", family / "b"], tmp_path / "k3", rank=3, base=family / "base", seed=4)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "k3").eval()
    from lightning_merge import Expert

    ea, eb = Expert(family / "a", base=family / "base"), Expert(family / "b", base=family / "base")
    manual = dict(state)
    for target in ea.lora.modules:
        f = lego_factors([(*e.lora.factors(target), e.lora.modules[target]["scaling"]) for e in (ea, eb)], 3, seed=4)
        manual[target] = state[target] + f.b @ f.a
    expected.load_state_dict(manual)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / "k3" / "lightning_merge.json").read_text())
    assert record["kind"] == "lora-lego" and record["seed"] == 4 and record["rank"] == 3
    # the same seed writes the same adapter
    merge_lora_lego([family / "a", family / "b"], tmp_path / "k3-again", rank=3, base=family / "base", seed=4)
    assert (tmp_path / "k3" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "k3-again" / "adapter_model.safetensors").read_bytes()


def test_folder_refusals_name_the_adapter_and_module(family, tmp_path):
    with pytest.raises(AdapterError, match=r"adapter '.*c' does not adapt 'model\.layers\.0\.self_attn\.v_proj'"):
        merge_lora_lego([family / "a", family / "c"], tmp_path / "x", rank=4, base=family / "base")
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*ranks 4, 2"):
        merge_lora_lego([family / "a", family / "b"], tmp_path / "x", rank=7, base=family / "base")
    with pytest.raises(ValueError, match="at least two adapters"):
        merge_lora_lego([family / "a"], tmp_path / "x", rank=2, base=family / "base")
    assert not (tmp_path / "x").exists()
    merge_lora_lego([family / "a", family / "b"], tmp_path / "y", rank=2, base=family / "base")
    with pytest.raises(FileExistsError):
        merge_lora_lego([family / "a", family / "b"], tmp_path / "y", rank=2, base=family / "base")
    merge_lora_lego([family / "a", family / "b"], tmp_path / "y", rank=2, base=family / "base", overwrite=True)
