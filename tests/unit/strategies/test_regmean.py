"""RegMean from captured input Gram matrices: the rule on values, its sanity properties, the sidecar forms, the
capture (after fit, during training, padding, resume, DDP, PEFT adapters), and parity with FusionBench's
``merging_with_regmean_weights`` (run in its own environment when one is found)."""

from __future__ import annotations

import pytest
import torch
from capture_helpers import Tiny, TinyLM, ddp_loader, lm_loader, loader, trainer
from conftest import FUSION_BENCH, fusion_bench_runs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_merge import Expert, RegMean, merge
from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.capture.grams import compute_grams
from lightning_merge.continual.state import ContinualError, ContinualState
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import Statistics, StatisticsError, write_statistics
from lightning_merge.strategies import NoContinualForm, Strategy


def _family(n=3, seed=0, rows=40):
    """A base, n experts (dict state dicts) and each expert's inputs X (rows × in) of both linear layers."""
    g = torch.Generator().manual_seed(seed)
    base = {"l0.weight": torch.randn(7, 5, generator=g), "l0.bias": torch.randn(7, generator=g),
            "l1.weight": torch.randn(3, 7, generator=g), "norm.weight": torch.randn(5, generator=g)}
    experts = [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    inputs = [{"l0.weight": torch.randn(rows, 5, generator=g) * (1 + i), "l1.weight": torch.randn(rows, 7, generator=g)}
              for i in range(n)]
    return base, experts, inputs


def _experts(experts, inputs, rows=40):
    out = []
    for e, x in zip(experts, inputs):
        stats = Statistics({f"gram/{k}": v.T @ v for k, v in x.items()}, {"gram": {"count": rows}}, "test")
        out.append(Expert(e, statistics=stats))
    return out


def _reference(experts, inputs, name, alpha, weights):
    """W* = (Σλ W G̃)(Σλ G̃)⁻¹ on the experts' weights (no base), G = XᵀX / rows: the paper's closed form."""
    grams = []
    for x, w in zip(inputs, weights):
        g = (x[name].T @ x[name]).double() / x[name].shape[0]
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        grams.append(w * g)
    num = sum(e[name].double() @ g for e, g in zip(experts, grams))
    return (num @ torch.linalg.inv(sum(grams))).float()


@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.3])
@pytest.mark.parametrize("with_base", [True, False])
def test_regmean_rule_on_values(alpha, with_base):
    base, experts, inputs = _family()
    weights = [1.0, 0.5, 2.0]
    got = merge(_experts(experts, inputs), base if with_base else None, RegMean(alpha=alpha, weights=weights))
    for name in ("l0.weight", "l1.weight"):
        torch.testing.assert_close(got[name], _reference(experts, inputs, name, alpha, weights), rtol=1e-4, atol=1e-5)
    for name in ("l0.bias", "norm.weight"):  # no Gram matrix: the weighted mean
        mean = sum(w * e[name] for w, e in zip(weights, experts)) / sum(weights)
        torch.testing.assert_close(got[name], mean, rtol=1e-5, atol=1e-6)


def test_regmean_sanity():
    """One expert comes back; equal Gram matrices give the weighted mean; α = 0 is a per-input-feature average
    weighted by the diagonals; a feature no expert saw takes the mean; the optimum beats the mean on the summed
    regression loss it minimises."""
    base, experts, inputs = _family()
    one = merge(_experts(experts[:1], inputs[:1]), base, RegMean())
    for k in base:
        torch.testing.assert_close(one[k], experts[0][k], rtol=1e-4, atol=1e-5)
    same = [dict(inputs[0]) for _ in experts]
    got = merge(_experts(experts, same), base, RegMean(alpha=1.0, weights=[1.0, 2.0, 1.0]))
    mean = (experts[0]["l0.weight"] + 2 * experts[1]["l0.weight"] + experts[2]["l0.weight"]) / 4
    torch.testing.assert_close(got["l0.weight"], mean, rtol=1e-4, atol=1e-5)
    got = merge(_experts(experts, inputs), base, RegMean(alpha=0.0))
    d = torch.stack([torch.diagonal(x["l0.weight"].T @ x["l0.weight"]) for x in inputs])  # (n, in)
    want = sum(e["l0.weight"] * d[i] for i, e in enumerate(experts)) / d.sum(0)
    torch.testing.assert_close(got["l0.weight"], want, rtol=1e-4, atol=1e-5)
    dead = [{k: v.clone() for k, v in x.items()} for x in inputs]
    for x in dead:
        x["l0.weight"][:, 2] = 0.0  # input feature 2 is never active
    got = merge(_experts(experts, dead), base, RegMean(alpha=1.0))
    torch.testing.assert_close(got["l0.weight"][:, 2], sum(e["l0.weight"][:, 2] for e in experts) / 3)
    assert torch.isfinite(got["l0.weight"]).all()
    got = merge(_experts(experts, inputs), base, RegMean(alpha=1.0))

    def loss(w):
        return sum(float(((x["l0.weight"] @ (w - e["l0.weight"]).T) ** 2).sum()) for e, x in zip(experts, inputs))

    assert loss(got["l0.weight"]) < loss(sum(e["l0.weight"] for e in experts) / 3)
    assert Strategy.from_dict(RegMean(alpha=0.5).to_dict()) == RegMean(alpha=0.5)
    for bad in (dict(alpha=1.5), dict(alpha=-0.1), dict(weights=[0.0, 0.0])):
        with pytest.raises(ValueError):
            RegMean(**bad)
    with pytest.raises(NoContinualForm, match="Gram"):
        RegMean().continual_form()


def test_scale_steps_along_the_merged_task_vector():
    """An extension: θ₀ + s·(RegMean − θ₀) on every tensor; s ≠ 1 needs the base (refused before any tensor);
    sweep_scale chooses s and gives merge() at that s."""
    from lightning_merge.tools.evaluation import sweep_scale

    base, experts, inputs = _family()
    one = merge(_experts(experts, inputs), base, RegMean())
    scaled = merge(_experts(experts, inputs), base, RegMean(scale=1.7))
    for k in base:
        torch.testing.assert_close(scaled[k], base[k] + 1.7 * (one[k] - base[k]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a base model"):
        merge(_experts(experts, inputs), None, RegMean(scale=1.7))
    result = sweep_scale(RegMean(), _experts(experts, inputs), base,
                         score=lambda st: -float((st["l0.weight"] - 2 * experts[0]["l0.weight"]).square().sum()),
                         scales=(0.5, 1.0, 1.5, 2.0))
    want = merge(_experts(experts, inputs), base, RegMean(scale=result.scale))
    for k in base:
        torch.testing.assert_close(result.state[k], want[k])


def test_regmean_refusals(tmp_path):
    base, experts, inputs = _family()
    with pytest.raises(StatisticsError, match="no 'gram' statistics"):
        merge(experts, base, RegMean())
    bad = Statistics({"gram/l0.weight": torch.eye(7), "gram/l1.weight": torch.eye(7)}, {"gram": {"count": 1}}, "x")
    with pytest.raises(StatisticsError, match=r"'l0.weight' has shape \[7, 7\].*\(in, in\)"):
        merge([Expert(experts[0], statistics=bad), *_experts(experts[1:], inputs[1:])], base, RegMean())
    negative = -torch.eye(5)
    bad = Statistics({"gram/l0.weight": negative, "gram/l1.weight": torch.eye(7)}, {"gram": {"count": 1}}, "neg")
    with pytest.raises(StatisticsError, match="neg.*not symmetric with a non-negative diagonal"):
        merge([Expert(experts[0], statistics=bad), *_experts(experts[1:], inputs[1:])], base, RegMean())
    with pytest.raises(ContinualError):
        ContinualState.create(tmp_path / "state", base=base, strategy=RegMean())


@pytest.mark.parametrize("form", ["full", "diagonal", "lowrank"])
def test_gram_forms_round_trip(tmp_path, form):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g) @ torch.randn(12, 12, generator=g)
    gram = x.T @ x
    path = write_statistics(tmp_path / "s.safetensors", {"gram": {"w": gram}},
                            {"gram": {"count": 50, "form": form, "rank": 4}})
    stats = Statistics.load(path)
    got = stats.get("w", "gram")
    assert stats.names("gram") == ["w"] and got.shape == (12, 12)
    torch.testing.assert_close(torch.diagonal(got), torch.diagonal(gram) / 50, rtol=1e-4, atol=1e-4)
    if form == "full":
        torch.testing.assert_close(got, gram / 50)
    elif form == "diagonal":
        assert torch.count_nonzero(got - torch.diag(torch.diagonal(got))) == 0
    else:  # the 4 leading eigenpairs exactly, the rest only on the diagonal
        evals, evecs = torch.linalg.eigh(gram.double() / 50)
        top = (evecs[:, -4:] * evals[-4:]) @ evecs[:, -4:].T
        off = ~torch.eye(12, dtype=torch.bool)
        torch.testing.assert_close(got[off].double(), top[off], rtol=1e-3, atol=1e-3)
        assert sorted(stats.keys()) == ["gram/w:diag", "gram/w:factor"]
    lowrank_exact = write_statistics(tmp_path / "r.safetensors", {"gram": {"w": x[:3].T @ x[:3]}},
                                     {"gram": {"count": 3, "form": "lowrank", "rank": 3}})
    torch.testing.assert_close(Statistics.load(lowrank_exact).get("w", "gram"), x[:3].T @ x[:3] / 3,
                               rtol=1e-3, atol=1e-3)  # rank ≥ the matrix's rank: exact
    with pytest.raises(StatisticsError, match="gram.form"):
        write_statistics(tmp_path / "bad.safetensors", {"gram": {"w": gram}}, {"gram": {"form": "sparse"}})


def test_capture_after_fit_equals_the_mean_input_gram(tmp_path):
    val = loader(24, 8, seed=1)
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader=val,
                               fisher_examples=20)
    model = Tiny(lr=1e-2)
    trainer(tmp_path, [capture]).fit(model, loader())
    stats = Statistics.load(tmp_path / "final.statistics.safetensors")
    assert stats.kinds["gram"]["count"] == {"net.0.weight": 20, "net.2.weight": 20}
    assert stats.kinds["gram"]["examples"] == 20 and stats.kinds["gram"]["source"] == "after_fit"
    x = torch.cat([b[0] for b in val])[:20]
    with torch.no_grad():
        h = torch.tanh(model.net[0](x))
    torch.testing.assert_close(stats.get("net.0.weight", "gram"), x.T @ x / 20, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.get("net.2.weight", "gram"), h.T @ h / 20, rtol=1e-5, atol=1e-6)
    merged = merge([tmp_path / "final.safetensors"] * 2, None, RegMean())  # an expert merged with itself
    torch.testing.assert_close(merged["net.0.weight"], model.net[0].weight.detach(), rtol=1e-4, atol=1e-5)


def test_capture_during_training_counts_every_training_forward(tmp_path):
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="train")
    model = Tiny(lr=0.0)  # weights fixed, so every epoch adds the same Σ xxᵀ
    trainer(tmp_path, [capture], max_epochs=2).fit(model, loader(32, 8), loader(16, 8, seed=1))
    stats = capture.finalize()
    x = torch.cat([b[0] for b in loader(32, 8)])
    assert stats.kinds["gram"]["count"]["net.0.weight"] == 64  # two epochs of 32; validation not counted
    torch.testing.assert_close(stats.get("net.0.weight", "gram"), x.T @ x / 32, rtol=1e-5, atol=1e-6)


def test_capture_leaves_padding_out():
    lm = TinyLM()
    batches = list(lm_loader(6, batch_size=3))
    sums, rows, count = compute_grams(lm.model, batches, num_examples=6)
    mask = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    assert count == 6 and rows["model.layers.0.self_attn.q_proj.weight"] == int(mask.sum())
    seen = []
    hook = lm.model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    x = torch.cat(seen)[mask]
    torch.testing.assert_close(sums["model.layers.0.self_attn.q_proj.weight"], x.T @ x, rtol=1e-4, atol=1e-4)


def test_training_gram_resumes_exactly(tmp_path):
    def capture():
        return CurvatureCapture(second_moments=False, fisher=False, gram="train", gram_form="diagonal")

    full = capture()
    trainer(tmp_path / "full", [full], max_epochs=4).fit(Tiny(lr=1e-2), loader())
    first = capture()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "part" / "ckpt", save_last=True)
    trainer(tmp_path / "part", [first, ckpt], max_epochs=2).fit(Tiny(lr=1e-2), loader())
    second = capture()
    trainer(tmp_path / "part", [second, ModelCheckpoint(dirpath=tmp_path / "part" / "c2")], max_epochs=4).fit(
        Tiny(lr=1e-2), loader(), ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    a, b = full.finalize(), second.finalize()
    assert a.kinds["gram"]["count"] == b.kinds["gram"]["count"] == {"net.0.weight": 128, "net.2.weight": 128}
    for name in ("net.0.weight", "net.2.weight"):
        torch.testing.assert_close(b.get(name, "gram"), a.get(name, "gram"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_spawn_grams_equal_one_process(tmp_path):
    def capture(mode):
        return CurvatureCapture(second_moments=False, fisher=False, gram=mode, fisher_examples=16)

    single = [capture("train"), capture("after_fit")]
    for c, folder in zip(single, ("train", "after")):
        trainer(tmp_path / "single" / folder, [c], max_epochs=2).fit(Tiny(lr=1e-2), loader(32, 8),
                                                                     loader(16, 8, seed=1))
    for mode, folder in (("train", "train"), ("after_fit", "after")):
        trainer(tmp_path / "ddp" / folder, [capture(mode)], max_epochs=2, strategy="ddp_spawn", devices=2,
                use_distributed_sampler=False).fit(Tiny(lr=1e-2), ddp_loader(32, 4), ddp_loader(16, 4, seed=1))
        a = Statistics.load(tmp_path / "single" / folder / "final.statistics.safetensors")
        b = Statistics.load(tmp_path / "ddp" / folder / "final.statistics.safetensors")
        assert a.kinds["gram"]["count"] == b.kinds["gram"]["count"]
        for name in ("net.0.weight", "net.2.weight"):
            torch.testing.assert_close(b.get(name, "gram"), a.get(name, "gram"), rtol=1e-4, atol=1e-6)


def test_lora_adapters_carry_the_gram_of_the_adapted_modules_input(tmp_path):
    base_dir = tmp_path / "base"
    TinyLM(seed=0).model.save_pretrained(base_dir)
    data = lm_loader(6, batch_size=2)
    lm = TinyLM(lr=1e-2, lora=True, base_path=str(base_dir))
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader=data,
                               fisher_examples=6)
    trainer(tmp_path, [capture], max_epochs=1).fit(lm, lm_loader(6))
    adapter = Expert(tmp_path / "final.adapter", base=base_dir)
    name = "model.layers.1.self_attn.v_proj.weight"
    got = adapter.statistic(name, "gram")
    seen = []
    layer = lm.model.base_model.model.model.layers[1].self_attn.v_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    lm.eval()
    with torch.no_grad():
        for b in data:
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    mask = torch.cat([b["attention_mask"].reshape(-1) for b in data]).bool()
    x = torch.cat(seen)[mask]
    torch.testing.assert_close(got, x.T @ x / int(mask.sum()), rtol=1e-4, atol=1e-5)
    with pytest.raises(StatisticsError, match="no Gram matrix"):  # a norm: not a linear weight
        adapter.statistic("model.norm.weight", "gram")
    torch.testing.assert_close(adapter.statistic("model.layers.0.mlp.up_proj.weight", "gram"), torch.zeros(16, 16))
    merged = merge([adapter, adapter], base_dir, RegMean())  # one adapter with itself: base + ΔW
    torch.testing.assert_close(merged[name], adapter.float32(name), rtol=1e-4, atol=1e-5)


REGMEAN_SCRIPT = """
import sys, torch
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
d = torch.load(sys.argv[1], weights_only=True)
out = merging_with_regmean_weights(d["params"], d["grams"], reduce_non_diagonal_ratio=d["alpha"])
torch.save(out, sys.argv[2])
"""


REGMEAN_ALPHAS = (1.0, 0.95, 0.6)


@pytest.fixture(scope="module")
def regmean_references(tmp_path_factory):
    """FusionBench's RegMean merge of the experts below at each α, from one FusionBench process."""
    folder = tmp_path_factory.mktemp("regmean")
    base, experts, inputs = _family(n=3, seed=2, rows=60)
    params = {k: [e[k] for e in experts] for k in base}
    grams = [{k[: -len(".weight")]: x[k].T @ x[k] / 60 for k in x} for x in inputs]
    for i, alpha in enumerate(REGMEAN_ALPHAS):
        torch.save({"params": params, "grams": grams, "alpha": alpha}, folder / f"in{i}.pt")
    fusion_bench_runs(REGMEAN_SCRIPT, [[folder / f"in{i}.pt", folder / f"out{i}.pt"]
                                       for i in range(len(REGMEAN_ALPHAS))], folder)
    return {alpha: torch.load(folder / f"out{i}.pt", weights_only=True) for i, alpha in enumerate(REGMEAN_ALPHAS)}


@pytest.mark.slow
@pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")
@pytest.mark.parametrize("alpha", REGMEAN_ALPHAS)
def test_regmean_matches_fusionbench(tmp_path, regmean_references, alpha):
    """The same experts and Gram matrices through FusionBench 0.2.33's merge: equal to 1e-5."""
    base, experts, inputs = _family(n=3, seed=2, rows=60)
    reference = regmean_references[alpha]
    for path, e, x in zip(range(3), experts, inputs):
        save_tensors(tmp_path / f"e{path}.safetensors", e)
        write_statistics(tmp_path / f"e{path}.statistics.safetensors", {"gram": {k: v.T @ v for k, v in x.items()}},
                         {"gram": {"count": 60}})
    ours = merge([tmp_path / f"e{i}.safetensors" for i in range(3)], None, RegMean(alpha=alpha))
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst


def test_bf16_mixed_training_accumulates_in_float32(tmp_path):
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="train")
    model = Tiny(lr=0.0)
    trainer(tmp_path, [capture], max_epochs=1, precision="bf16-mixed").fit(model, loader(32, 8))
    stats = capture.finalize()
    x = torch.cat([b[0] for b in loader(32, 8)])
    assert stats.get("net.0.weight", "gram").dtype == torch.float32
    torch.testing.assert_close(stats.get("net.0.weight", "gram"), x.T @ x / 32, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.tanh(model.net[0](x)).float()  # the bf16 activations the second layer saw
    torch.testing.assert_close(stats.get("net.2.weight", "gram"), h.T @ h / 32, rtol=1e-4, atol=1e-5)


def test_merge_on_fit_end_merges_the_trained_model_with_regmean(tmp_path):
    """MergeOnFitEnd(strategy=RegMean()) takes the Gram matrices of the model just trained from the capture, and
    refuses at setup when the capture does not record them."""
    from lightning_merge.callbacks import MergeOnFitEnd

    val = loader(16, 8, seed=1)
    first = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader=val)
    trainer(tmp_path / "a", [first], max_epochs=1).fit(Tiny(lr=5e-2, seed=1), loader(32, 8, seed=2))
    expert = tmp_path / "a" / "final.safetensors"
    merger = MergeOnFitEnd(experts=[str(expert)], strategy=RegMean(), dirpath=str(tmp_path / "run"))
    capture = CurvatureCapture(second_moments=False, fisher=False, gram="after_fit", fisher_loader=val)
    model = Tiny(lr=5e-2)
    trainer(tmp_path / "run", [merger, capture], max_epochs=1).fit(model, loader(32, 8, seed=3))
    by_hand = merge([tmp_path / "run" / "final.safetensors", expert], None, RegMean())
    for name, value in by_hand.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    no_gram = MergeOnFitEnd(experts=[str(expert)], strategy=RegMean(), dirpath=str(tmp_path / "run2"))
    with pytest.raises(ValueError, match="needs the 'gram' statistic of the model this fit trains.*gram= for"):
        trainer(tmp_path / "run2", [no_gram, CurvatureCapture()], max_epochs=1).fit(Tiny(lr=5e-2), loader(32, 8))


def test_a_layer_called_with_a_keyword_input_is_counted():
    class KeywordCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.inner(input=x)

    module = KeywordCall()
    x = torch.randn(5, 3)
    sums, rows, count = compute_grams(module, [(x,)], num_examples=5)
    assert rows == {"inner.weight": 5} and count == 5
    torch.testing.assert_close(sums["inner.weight"], x.T @ x)
