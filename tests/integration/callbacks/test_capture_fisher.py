"""Post-fit Fisher estimators (per-example empirical and sampled true), the log-likelihood protocol, DDP and
bf16-mixed captures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture_helpers import Tiny, batch_grads, data, ddp_loader, loader, trainer
from torch import nn

from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.capture.fisher import _vmap_squared_grads, compute_fisher, default_logits_fn, log_likelihood
from lightning_merge.formats.sidecar import Statistics


def per_example_reference(model, x, y):
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
        for n, p in model.named_parameters():
            out[n] += p.grad**2
    return out


def exact_true_reference(model, x):
    """Σₓ Σ_y p(y|x) (∇ log p(y|x))², enumerating the classes."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        probs = torch.softmax(model(x[i : i + 1]), -1)[0].detach()
        for c in range(probs.numel()):
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), -1)[0, c].backward()
            for n, p in model.named_parameters():
                out[n] += probs[c] * p.grad**2
    return out


def test_per_example_fisher_equals_loop_over_examples_and_vmap_is_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = data(20)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 20, 8)]
    sums, count = compute_fisher(model, batches, num_examples=17)
    assert count == 17
    ref = per_example_reference(model, x[:17], y[:17])
    for n in ref:
        torch.testing.assert_close(sums[n], ref[n], rtol=1e-5, atol=1e-8)
    loop, _ = compute_fisher(model, batches, num_examples=17, use_vmap=False)
    direct, labelled = _vmap_squared_grads(model, dict(model.named_parameters()), batches[0], None,
                                           default_logits_fn(model))
    assert labelled == 8
    ref8 = per_example_reference(model, x[:8], y[:8])
    for n in ref:
        torch.testing.assert_close(loop[n], ref[n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(direct[n], ref8[n], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_true_fisher_is_an_unbiased_sample_of_the_exact_expectation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = data(6)
    exact = exact_true_reference(model, x)
    sums, count = compute_fisher(model, [(x, y)], estimator="true", num_examples=6, samples=400, seed=1)
    total = sum(v.sum() for v in exact.values())
    got = sum(v.sum() for v in sums.values())
    assert abs(got - total) / total < 0.05
    again, _ = compute_fisher(model, [(x, y)], estimator="true", num_examples=6, samples=400, seed=1)
    assert all(torch.equal(again[n], sums[n]) for n in sums)  # seeded


def test_exact_fisher_equals_the_expectation_over_classes_with_vmap_and_with_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = data(10)
    y[3] = -100  # an example without a target takes no part
    keep = torch.arange(10) != 3
    want = exact_true_reference(model, x[keep])
    for use_vmap in (True, False):
        sums, count = compute_fisher(model, [(x[:6], y[:6]), (x[6:], y[6:])], estimator="exact", num_examples=10,
                                     use_vmap=use_vmap)
        assert count == 9  # M: the example without a target is not counted either
        for n in want:
            torch.testing.assert_close(sums[n], want[n], rtol=1e-5, atol=1e-8)


def _hand_fisher(model, examples, estimator):
    """(1/M) Σ over the examples with a label of (∇ log p(y|x))², by torch.autograd one example at a time
    (``"exact"``: Σ_c p(c|x)(∇ log p(c|x))²); M counts only those examples. ``examples``: (input, targets) pairs,
    targets a class (or -100) or a sequence of tokens (-100 ignored, log p summed over the others)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    m = 0
    for inputs, targets in examples:
        valid = targets != -100
        if not bool(valid.any()):
            continue
        m += 1
        logp = torch.log_softmax(model(inputs.unsqueeze(0))[0], -1)
        if estimator == "exact":
            labels = [(c, float(logp.detach().exp()[c])) for c in range(logp.shape[-1])]
        else:
            labels = [(targets, 1.0)]
        for label, weight in labels:
            picked = logp[label] if logp.dim() == 1 else logp[valid].gather(-1, label[valid].unsqueeze(-1)).sum()
            grads = torch.autograd.grad(picked, list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                total[n] += weight * g.square()
    return {n: v / m for n, v in total.items()}, m


@pytest.mark.parametrize("estimator", ["example", "exact"])
def test_examples_whose_label_is_ignored_do_not_count_in_m(estimator):
    """Issue 33: M counts the examples with a label. Two of ten classification examples have label -100; the
    estimate sums/M equals the hand-computed Fisher over the eight others divided by 8 (it was divided by 10)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = data(10)
    y[2] = y[7] = -100
    want, m = _hand_fisher(model, list(zip(x, y)), estimator)
    assert m == 8
    for use_vmap in (True, False):
        sums, count = compute_fisher(model, [(x[:6], y[:6]), (x[6:], y[6:])], estimator=estimator,
                                     num_examples=10, use_vmap=use_vmap)
        assert count == 8
        for n in want:
            torch.testing.assert_close(sums[n] / count, want[n], rtol=1e-5, atol=1e-8)


class TokenModel(nn.Module):
    """Logits for every position of a token sequence (a tiny token-level LM)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.out = nn.Linear(5, 7)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens)))


def test_token_level_m_counts_sequences_with_a_predicted_token():
    """For sequences log p(y|x) is the sum over the positions whose label is not -100 and M counts sequences
    (the per-sequence Fisher, as the batch estimator's): a sequence whose every label is -100 is not counted, one
    with a single predicted token counts once."""
    torch.manual_seed(4)
    model = TokenModel()
    tokens = torch.randint(0, 7, (6, 5))
    labels = torch.randint(0, 7, (6, 5))
    labels[1] = -100  # nothing predicted
    labels[3, :4] = -100  # one predicted token
    labels[4, ::2] = -100

    def logits_fn(batch):
        return model(batch[0]), batch[1]

    want, m = _hand_fisher(model, list(zip(tokens, labels)), "example")
    assert m == 5
    for use_vmap in (True, False):
        sums, count = compute_fisher(model, [(tokens[:4], labels[:4]), (tokens[4:], labels[4:])],
                                     num_examples=6, logits_fn=logits_fn, use_vmap=use_vmap)
        assert count == 5
        for n in want:
            torch.testing.assert_close(sums[n] / count, want[n], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="no examples with a label"):
        compute_fisher(model, [(tokens[1:2], labels[1:2])], logits_fn=logits_fn)


def test_exact_fisher_of_softmax_regression_is_p_one_minus_p_times_x_squared():
    torch.manual_seed(1)
    model = nn.Linear(5, 4)
    x = torch.randn(7, 5)
    sums, _ = compute_fisher(model, [(x, torch.zeros(7, dtype=torch.long))], estimator="exact", num_examples=7)
    p = torch.softmax(model(x), -1).detach()
    # Σ_c p_c (δ_ck − p_k)² = p_k (1 − p_k): the diagonal Fisher of W[k, j] is Σₓ p_k(1 − p_k) x_j²
    torch.testing.assert_close(sums["weight"], (p * (1 - p)).T @ x.square(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sums["bias"], (p * (1 - p)).sum(0), rtol=1e-5, atol=1e-7)


def test_exact_fisher_refuses_sequences_and_huge_vocabularies():
    model = nn.Linear(4, 3)

    def sequence_logits(batch):
        return torch.randn(2, 5, 3, requires_grad=True), torch.zeros(2, 5, dtype=torch.long)

    with pytest.raises(ValueError, match="one class label per example.*estimator='true'"):
        compute_fisher(model, [torch.zeros(2, 4)], estimator="exact", logits_fn=sequence_logits)
    wide = nn.Linear(4, 2000)
    with pytest.raises(ValueError, match="2000 classes is more than 1000: use estimator='true'"):
        compute_fisher(wide, [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))], estimator="exact")


def test_capture_writes_the_exact_fisher_and_strategies_prefer_it(tmp_path):
    capture = CurvatureCapture(fisher_after_fit="exact", fisher_examples=16)
    trainer(tmp_path, [capture], max_epochs=1).fit(Tiny(lr=1e-2), loader(32, 8), loader(16, 8, seed=1))
    stats = Statistics.load(tmp_path / "final.statistics.safetensors")
    assert stats.kinds["fisher.exact"]["count"] == 16
    assert stats.resolve_kind("fisher") == "fisher.exact"  # preferred over the batch estimate


def test_log_likelihood_ignores_minus_100_and_sums_positions():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 0, 0] + logp[1, 1, 2]
    torch.testing.assert_close(log_likelihood(logits, targets), expected)


def test_fisher_logits_protocol_and_clear_error_without_it():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, features):
            return self.lin(features)

        def fisher_logits(self, batch):
            return self(batch["features"]), batch["target"]

    model = DictModel()
    x, y = data(8)
    sums, _ = compute_fisher(model, [{"features": x, "target": y}], num_examples=8)
    ref = per_example_reference(model, x, y)
    for n in ref:
        torch.testing.assert_close(sums[n], ref[n], rtol=1e-5, atol=1e-8)

    with pytest.raises(TypeError, match="define `fisher_logits"):
        compute_fisher(nn.Linear(4, 3), [{"features": x}], num_examples=8)


def test_callback_post_fit_fisher_over_the_validation_loader(tmp_path):
    capture = CurvatureCapture(fisher_after_fit="example", fisher_examples=12)
    model = Tiny(lr=0.0)
    trainer(tmp_path, [capture], max_epochs=1).fit(model, loader(), loader(16, 8, seed=1))
    stats = Statistics.load(tmp_path / "final.statistics.safetensors")
    assert stats.kinds["fisher.example"]["count"] == 12
    x, y = data(16, seed=1)
    ref = per_example_reference(Tiny(lr=0.0), x[:12], y[:12])
    for n in ref:
        torch.testing.assert_close(stats.get(n, "fisher"), ref[n] / 12, rtol=1e-5, atol=1e-9)  # prefers example
        assert stats.has("fisher") and stats.get(n, "fisher", "batch").shape == ref[n].shape


@pytest.mark.slow
def test_ddp_spawn_statistics_equal_one_process_on_the_same_global_batch(tmp_path):
    single = tmp_path / "single"
    trainer(single, [CurvatureCapture(fisher_after_fit="example", fisher_examples=16)], max_epochs=2).fit(
        Tiny(lr=1e-2), loader(32, 8), loader(16, 8, seed=1)
    )
    ddp = tmp_path / "ddp"
    trainer(
        ddp,
        [CurvatureCapture(fisher_after_fit="example", fisher_examples=16)],
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    ).fit(Tiny(lr=1e-2), ddp_loader(32, 4), ddp_loader(16, 4, seed=1))
    assert sorted(p.name for p in ddp.iterdir()) == ["final.safetensors", "final.statistics.safetensors"]
    a = Statistics.load(single / "final.statistics.safetensors")
    b = Statistics.load(ddp / "final.statistics.safetensors")
    assert b.kinds["fisher.batch"]["batch_size"] == a.kinds["fisher.batch"]["batch_size"] == 8
    assert b.kinds["fisher.batch"]["world_size"] == 2
    assert b.kinds["fisher.example"]["count"] == 16
    for name in a.names("exp_avg_sq"):
        torch.testing.assert_close(b.get(name, "exp_avg_sq"), a.get(name, "exp_avg_sq"), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(
            b.get(name, "fisher", "batch"), a.get(name, "fisher", "batch"), rtol=1e-4, atol=1e-12
        )
        torch.testing.assert_close(
            b.get(name, "fisher", "example"), a.get(name, "fisher", "example"), rtol=1e-4, atol=1e-12
        )


def test_bf16_mixed_records_float32_statistics_of_the_autocast_gradients(tmp_path):
    capture = CurvatureCapture()
    trainer(tmp_path, [capture], max_epochs=1, precision="bf16-mixed").fit(Tiny(lr=0.0), loader())
    stats = capture.finalize()
    model = Tiny(lr=0.0)
    x, y = data(32)
    grads = []
    for i in range(0, 32, 8):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    fp32 = batch_grads(Tiny(lr=0.0), [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)])
    for n in grads[0]:
        got = stats.raw(n, "fisher", "batch")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, 8 * sum(g[n] ** 2 for g in grads) / 4, rtol=1e-5, atol=1e-10)
        # and close to the float32 run's statistic (bf16 rounding of activations only)
        torch.testing.assert_close(got, 8 * sum(g[n] ** 2 for g in fp32) / 4, rtol=0.1, atol=1e-4)
