"""RegMean++: the Gram matrices it reads (on the merged model, layer by layer), what it merges them into, the
identities it must satisfy (one expert; experts whose earlier layers agree give RegMean), merge() writing the same
model from the experts it hands back, its refusals, and FusionBench's ``regmean_plusplus`` (when a fusion-bench
environment is found)."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSION_BENCH, HELPERS, fusion_bench_runs
from fusionbench_regmeanpp_reference import TinyEncoder
from torch import nn

from lightning_merge import Expert, RegMean, merge
from lightning_merge.capture.grams import compute_grams
from lightning_merge.tools.regmean_plusplus import find_layers, regmean_plusplus


def _family(n=3, seed=0, noise=0.3, same=()):
    """A base TinyEncoder, n experts (base + noise; tensors whose name starts with one of ``same`` equal the base's)
    and each expert's token batches."""
    torch.manual_seed(seed)
    base = TinyEncoder().state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    experts = [{k: v if k.startswith(same) and same else v + noise * torch.randn(v.shape, generator=g)
                for k, v in base.items()} for _ in range(n)]
    tokens = [torch.randint(0, 13, (48, 5), generator=g) for _ in range(n)]
    loaders = [[t[s:s + 16] for s in range(0, 48, 16)] for t in tokens]
    return base, experts, loaders


def _module(state):
    model = TinyEncoder()
    model.load_state_dict(state)
    return model


def test_second_layer_grams_are_read_on_the_merged_first_layer():
    """y = W₂(W₁x): layer 1's Gram matrix for expert i is the mean of (W₁* xᵢ)(W₁* xᵢ)ᵀ, W₁* the RegMean merge of
    the first layer (from the experts' own inputs xᵢ), and layer 1 is RegMean's solve with those."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    base = net.state_dict()
    g = torch.Generator().manual_seed(1)
    experts = [{k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    xs = [torch.randn(20, 5, generator=g) * (1 + i) for i in range(2)]
    result = regmean_plusplus(net, experts, [[x[:10], x[10:]] for x in xs], alpha=1.0)
    assert result.layers == ["0", "1"]
    w1 = [e["0.weight"].double() for e in experts]
    g1 = [x.double().T @ x.double() / 20 for x in xs]
    w1_star = sum(w @ gi for w, gi in zip(w1, g1)) @ torch.linalg.inv(sum(g1))
    torch.testing.assert_close(result.state["0.weight"].double(), w1_star, rtol=1e-5, atol=1e-6)
    for i, x in enumerate(xs):
        h = x.double() @ w1_star.T
        torch.testing.assert_close(result.grams[i]["1.weight"].double(), h.T @ h / 20, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.grams[i]["0.weight"].double(), g1[i], rtol=1e-5, atol=1e-6)
    g2 = [h.T @ h / 20 for h in (x.double() @ w1_star.T for x in xs)]
    w2 = [e["1.weight"].double() for e in experts]
    w2_star = sum(w @ gi for w, gi in zip(w2, g2)) @ torch.linalg.inv(sum(g2))
    torch.testing.assert_close(result.state["1.weight"].double(), w2_star, rtol=1e-5, atol=1e-6)
    # the experts' own second-layer inputs would give another matrix: the test tells the two apart
    own = [(x.double() @ w.T).T @ (x.double() @ w.T) / 20 for x, w in zip(xs, w1)]
    assert float((own[0] - g2[0]).abs().max()) > 1e-2
    # the module ends holding the merge
    torch.testing.assert_close(net[1].weight.detach(), result.state["1.weight"])


def test_one_expert_gives_it_back():
    base, experts, loaders = _family(n=1)
    result = regmean_plusplus(TinyEncoder(), experts, loaders, base=base)
    for k, v in experts[0].items():
        torch.testing.assert_close(result.state[k], v, rtol=1e-5, atol=1e-5)


def test_experts_that_agree_before_the_last_layer_give_regmean():
    """Earlier layers equal in every expert: the merged model feeds the last layer what each expert feeds it, so
    RegMean++ is RegMean with each expert's own Gram matrices (compute_grams on its own data)."""
    same = ("embed.", "pre_norm.", "layers.0.", "layers.1.")
    base, experts, loaders = _family(n=3, seed=2, same=same)
    result = regmean_plusplus(TinyEncoder(), experts, loaders, base=base)
    carried = []
    for e, batches in zip(experts, loaders):
        sums, rows, _ = compute_grams(_module(e), batches, num_examples=48)
        carried.append(Expert(e, statistics={"gram": {n: s / rows[n] for n, s in sums.items()}}))
    regmean = merge(carried, base, RegMean())
    for k in base:
        torch.testing.assert_close(result.state[k], regmean[k], rtol=1e-5, atol=1e-6)
    for i, e in enumerate(carried):
        torch.testing.assert_close(result.grams[i]["layers.2.fc2.weight"], e.statistic("layers.2.fc2.weight", "gram"),
                                   rtol=1e-5, atol=1e-6)


def test_differs_from_regmean_when_earlier_layers_differ():
    base, experts, loaders = _family(n=3, seed=3)
    result = regmean_plusplus(TinyEncoder(), experts, loaders, base=base)
    carried = []
    for e, batches in zip(experts, loaders):
        sums, rows, _ = compute_grams(_module(e), batches, num_examples=48)
        carried.append(Expert(e, statistics={"gram": {n: s / rows[n] for n, s in sums.items()}}))
    regmean = merge(carried, base, RegMean())
    # layer 0's inputs are the merged embeddings (the mean): RegMean's own-embedding Grams differ, and so does every
    # later layer
    assert float((result.state["layers.2.fc1.weight"] - regmean["layers.2.fc1.weight"]).abs().max()) > 1e-3
    # tensors without Gram matrices are the experts' mean either way
    torch.testing.assert_close(result.state["layers.1.ln.weight"], regmean["layers.1.ln.weight"])


def test_merge_writes_the_same_model_from_the_experts_it_hands_back(tmp_path):
    base, experts, loaders = _family(n=2, seed=4)
    model = TinyEncoder()
    result = regmean_plusplus(model, experts, loaders, base=base, alpha=0.6, weights=[1.0, 2.0])
    assert result.strategy == RegMean(alpha=0.6, weights=[1.0, 2.0])
    written = merge(result.experts, base, result.strategy, out=tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    on_disk = load_file(written)
    for k, v in result.state.items():
        torch.testing.assert_close(on_disk[k], v, rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert set(result.grams[0]) == {f"layers.{i}.{m}.weight" for i in range(3) for m in ("fc1", "fc2")}


def test_find_layers_groups_linears_by_block_and_keeps_others_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)) for _ in range(2)])
            self.head = nn.Linear(3, 2)

    net = Net()
    names = [n for n in net.state_dict() if n.endswith("weight")]
    assert find_layers(net, names) == ["layers.0", "layers.1", "head"]
    assert find_layers(net, ["head.weight"]) == ["head"]


def test_refusals():
    base, experts, loaders = _family(n=2)
    with pytest.raises(ValueError, match="2 loaders for 3 experts"):
        regmean_plusplus(TinyEncoder(), experts + [experts[0]], loaders)
    with pytest.raises(ValueError, match="not a module of the model"):
        regmean_plusplus(TinyEncoder(), experts, loaders, layers=["layers.9"])
    with pytest.raises(ValueError, match="inside layer 'layers'"):
        regmean_plusplus(TinyEncoder(), experts, loaders, layers=["layers", "layers.0"])
    with pytest.raises(ValueError, match="loaders\\[1\\].*no examples"):
        regmean_plusplus(TinyEncoder(), experts, [loaders[0], []])
    with pytest.raises(ValueError, match="the model has no tensor 'extra'"):
        regmean_plusplus(TinyEncoder(), [{**e, "extra": torch.ones(2)} for e in experts], loaders)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(self.layer(x))

    state = Twice().state_dict()
    with pytest.raises(ValueError, match="'layer' is called 2 times per forward"):
        regmean_plusplus(Twice(), [state, state], [[torch.randn(4, 3)]] * 2)


PLUSPLUS_ALPHAS = (0.95, 0.6)


@pytest.fixture(scope="module")
def plusplus_references(tmp_path_factory):
    """FusionBench's RegMean++ merge of the family below at each α, from one FusionBench process."""
    base, experts, loaders = _family(n=3, seed=5)
    folders = [tmp_path_factory.mktemp(f"regmeanpp{i}") for i in range(len(PLUSPLUS_ALPHAS))]
    for folder in folders:
        torch.save(base, folder / "base.pt")
        for i, (e, batches) in enumerate(zip(experts, loaders)):
            torch.save(e, folder / f"expert{i}.pt")
            torch.save(torch.cat(batches), folder / f"tokens{i}.pt")
    fusion_bench_runs(HELPERS / "fusionbench_regmeanpp_reference.py",
                      [[folder, 3, alpha, 48, 16] for folder, alpha in zip(folders, PLUSPLUS_ALPHAS)], folders[0])
    return {alpha: torch.load(folder / "fusionbench.pt", weights_only=True)
            for folder, alpha in zip(folders, PLUSPLUS_ALPHAS)}


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("alpha", PLUSPLUS_ALPHAS)
def test_matches_fusionbench_regmean_plusplus(plusplus_references, alpha):
    """FusionBench 0.2.33's RegMeanAlgorithmPlusPlus.run on a three-block encoder (its CLIP subclass's Gram hooks,
    this model's embedding merge and layer forward), 3 experts, 48 examples per task in batches of 16: equal to
    1e-5 of each tensor's largest entry, where RegMean from the experts' own inputs is 1e-3 away or more."""
    base, experts, loaders = _family(n=3, seed=5)
    reference = plusplus_references[alpha]
    ours = regmean_plusplus(TinyEncoder(), experts, loaders, base=base, alpha=alpha).state
    assert set(ours) == set(reference)
    worst = max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)
    assert worst < 1e-5, worst
    carried = []
    for e, batches in zip(experts, loaders):
        sums, rows, _ = compute_grams(_module(e), batches, num_examples=48)
        carried.append(Expert(e, statistics={"gram": {n: s / rows[n] for n, s in sums.items()}}))
    regmean = merge(carried, base, RegMean(alpha=alpha))
    assert max(float((regmean[k] - reference[k]).abs().max()) for k in reference) > 1e-3


def test_a_llama_with_lora_adapter_experts(tmp_path):
    """Hugging Face decoder layers (called with keyword arguments, rotary embeddings) and PEFT adapter experts over
    a bf16 base: the decoder layers then lm_head in the forward's order, the merge in the base's dtype, tensors no
    adapter changes equal to the base's, and merge() writing the same model from the experts handed back."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    experts = []
    for i in range(2):
        model = peft.get_peft_model(
            transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
            peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False))
        model.save_pretrained(tmp_path / f"e{i}")
        experts.append(tmp_path / f"e{i}")
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 40, (12, 7), generator=g) for _ in range(2)]
    loaders = [[{"input_ids": x[s:s + 4], "labels": x[s:s + 4]} for s in range(0, 12, 4)] for x in ids]
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    result = regmean_plusplus(model, experts, loaders, tmp_path / "base", num_examples=12)
    assert result.layers == ["model.layers.0", "model.layers.1", "lm_head"]
    base = Expert(tmp_path / "base")
    assert {v.dtype for v in result.state.values()} == {torch.bfloat16}
    for name in ("lm_head.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(result.state[name], base.tensor(name), rtol=0, atol=0)
    changed = "model.layers.1.self_attn.q_proj.weight"
    assert float((result.state[changed].float() - base.float32(changed)).abs().max()) > 1e-3
    again = merge(result.experts, tmp_path / "base", result.strategy)
    for k, v in result.state.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)
