"""The LLM fine-tuning path: Hugging Face's token-mean causal-LM loss, LoRA runs, bf16 bases.

The batch Fisher estimates the per-sequence (token-summed) Fisher whatever the loss's reduction: with one sequence
per step and fixed weights it equals the per-example Fisher exactly (it was 1/N² of it, N the tokens per sequence).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from capture_helpers import TinyLM, lm_examples, lm_loader, pad_lm, trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_merge import Expert, Fisher, merge  # noqa: E402
from lightning_merge.callbacks import CurvatureCapture  # noqa: E402
from lightning_merge.capture.fisher import batch_counts  # noqa: E402


def _grads(model: TinyLM, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in batches:
        model.zero_grad()
        model.model(**batch).loss.backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def test_counts_follow_the_causal_shift_and_ignore_padding():
    batch = pad_lm(lm_examples(3, seed=4))
    lengths = batch["attention_mask"].sum(1)
    model = TinyLM()
    assert batch_counts(batch, model) == (3, int((lengths - 1).sum()))  # position t predicts token t + 1
    assert batch_counts(batch, model, "example_mean") == (3, 3)
    assert batch_counts(batch, model, "sum") == (3, 1)


def test_one_sequence_per_step_gives_the_per_example_fisher(tmp_path):
    """B = 1, fixed weights: N²·g² of the token mean is (∇ Σ log p)² of that sequence, the per-example term."""
    capture = CurvatureCapture(second_moments=False, fisher_after_fit="example", fisher_loader=lm_loader(8),
                               fisher_examples=8)
    trainer(tmp_path, [capture], max_epochs=1).fit(TinyLM(lr=0.0), lm_loader(8))
    stats = capture.finalize()
    assert stats.kinds["fisher.batch"]["batch_size"] == 1
    assert stats.kinds["fisher.batch"]["tokens_per_step"] > 5  # tokens, not sequences, set the scale
    for name in stats.names("fisher.batch"):
        batch = stats.get(name, "fisher", "batch")
        example = stats.get(name, "fisher", "example")
        assert float((batch - example).norm() / example.norm()) < 1e-3, name


@pytest.mark.slow
def test_padded_batches_weight_each_step_by_its_own_tokens(tmp_path):
    capture = CurvatureCapture(second_moments=False)
    trainer(tmp_path, [capture], max_epochs=1).fit(TinyLM(lr=0.0), lm_loader(8, batch_size=2))
    stats = capture.finalize()
    batches = [pad_lm(lm_examples(8)[i: i + 2]) for i in range(0, 8, 2)]
    weights = [batch_counts(b, TinyLM())[1] ** 2 / 2 for b in batches]  # N² / B per step
    grads = _grads(TinyLM(lr=0.0), batches)
    for name in stats.names("fisher.batch"):
        expected = sum(w * g[name] ** 2 for w, g in zip(weights, grads)) / len(grads)
        torch.testing.assert_close(stats.get(name, "fisher", "batch"), expected, rtol=1e-4, atol=1e-12)


@pytest.mark.slow
def test_accumulation_weights_the_effective_batch(tmp_path):
    capture = CurvatureCapture(second_moments=False)
    trainer(tmp_path, [capture], max_epochs=1, accumulate_grad_batches=2).fit(TinyLM(lr=0.0), lm_loader(8))
    stats = capture.finalize()
    micro = [pad_lm([e]) for e in lm_examples(8)]
    tokens = [batch_counts(b, TinyLM())[1] for b in micro]
    model = TinyLM(lr=0.0)
    expected: dict[str, torch.Tensor] = {}
    for step in range(4):  # g = (g₁ + g₂)/2 of two one-sequence micro-batches; w = A² · (ΣNₐ/ΣBₐ) / Σ 1/Nₐ
        model.zero_grad()
        for b in micro[2 * step: 2 * step + 2]:
            (model.model(**b).loss / 2).backward()
        n = tokens[2 * step: 2 * step + 2]
        w = 4 * (sum(n) / 2) / sum(1 / t for t in n)  # a sequence's Fisher grows with its length
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + w * p.grad ** 2 / 4
    for name in stats.names("fisher.batch"):
        torch.testing.assert_close(stats.get(name, "fisher", "batch"), expected[name], rtol=1e-4, atol=1e-12)


def test_a_lora_run_saves_adapters_with_statistics_not_full_models(tmp_path):
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(__import__("capture_helpers").tiny_llama_config()).save_pretrained(base)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=2, monitor="step", mode="max",
                           every_n_train_steps=2)
    capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=lm_loader(4), fisher_examples=4)
    module = TinyLM(lr=1e-2, lora=True, base_path=str(base))
    trainer(tmp_path, [capture, ckpt], max_epochs=1).fit(module, lm_loader(8))
    folder = tmp_path / "ckpt"
    adapters = sorted(p.name for p in folder.iterdir() if p.name.endswith(".adapter") and p.name != "final.adapter")
    checkpoints = sorted(p.name[: -len(".ckpt")] for p in folder.glob("*.ckpt"))
    assert [a[: -len(".adapter")] for a in adapters] == checkpoints and len(checkpoints) == 2  # rotated together
    final = folder / "final.adapter"
    assert final.is_dir() and not (folder / "final.safetensors").exists()
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "lightning_merge.json", "statistics.safetensors"]
    # lightning_merge.json lists what the capture wrote: the next save (or rotation) may replace only that
    assert json.loads((final / "lightning_merge.json").read_text())["files"] == [
        "adapter_config.json", "adapter_model.safetensors", "statistics.safetensors"]
    expert = Expert(final)  # the base comes from adapter_config.json
    merged_back = module.model.merge_and_unload().state_dict()
    for name in expert.names():
        torch.testing.assert_close(expert.tensor(name).float(), merged_back[name].float(), rtol=1e-5, atol=1e-6)
    assert expert.has_statistic("fisher") and expert.has_statistic("exp_avg_sq")
    out = merge([final, folder / f"{checkpoints[0]}.adapter"], strategy=Fisher(), out=tmp_path / "m", output="peft",
                rank=8)
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ddp_weights_each_step_by_every_rank_s_tokens(tmp_path):
    """Two ranks with one sequence each give the statistics of one process accumulating the same two sequences:
    the weight needs both ranks' token counts (an all-reduce), not this rank's times the world size."""
    from capture_helpers import lm_ddp_loader

    from lightning_merge.formats.sidecar import Statistics

    trainer(tmp_path / "single", [CurvatureCapture(second_moments=False)], max_epochs=1,
            accumulate_grad_batches=2).fit(TinyLM(lr=0.0), lm_loader(8))
    trainer(tmp_path / "ddp", [CurvatureCapture(second_moments=False)], max_epochs=1, strategy="ddp_spawn",
            devices=2, use_distributed_sampler=False).fit(TinyLM(lr=0.0), lm_ddp_loader(8))
    a = Statistics.load(tmp_path / "single" / "final.statistics.safetensors")
    b = Statistics.load(tmp_path / "ddp" / "final.statistics.safetensors")
    assert a.kinds["fisher.batch"]["tokens_per_step"] == b.kinds["fisher.batch"]["tokens_per_step"]
    for name in a.names("fisher.batch"):
        torch.testing.assert_close(b.get(name, "fisher", "batch"), a.get(name, "fisher", "batch"), rtol=1e-4,
                                   atol=1e-12)


@pytest.fixture
def adapters(tmp_path):
    from capture_helpers import tiny_llama_config

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    folders = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj", "o_proj"])):
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        model = peft.get_peft_model(base, peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets,
                                                          init_lora_weights=False))
        model.save_pretrained(tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    return tmp_path / "base", folders


def test_the_command_line_writes_adapters_and_reads_mergekit_lora_references(adapters, tmp_path, capsys):
    import yaml

    from lightning_merge.cli.commands import main

    base, folders = adapters
    recipe = {"strategy": {"name": "task_arithmetic", "weights": [0.5, 0.5]},
              "base_model": str(base),
              "models": [{"model": f"{base}+{folders[0]}"},
                         {"model": {"model": {"path": str(base)}, "lora": {"path": str(folders[1])}}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "exact"), "--output", "peft"]) == 0
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "svd"), "--output", "peft", "--rank", "5"]) == 0
    full = merge(folders, base, __import__("lightning_merge").TaskArithmetic(weights=[0.5, 0.5]))
    for out in ("exact", "svd"):
        back = Expert(tmp_path / out, base=base)
        for name, value in full.items():
            torch.testing.assert_close(back.tensor(name).float(), value.float(), rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "exact")]) == 0
    text = capsys.readouterr().out
    assert "(adapter)" in text and "LoRA        rank [2, 3, 5]" in text and "merged by" in text and "(found)" in text
    assert main(["inspect", "--json", str(folders[1])]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["rank"] == 3 and info["base_found"]
