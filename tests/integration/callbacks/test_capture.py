"""CurvatureCapture: values against hand computations (Adam with lr=0 keeps the weights fixed, so every
gradient is known), sidecars next to checkpoints with rotation and save_last, exact resume, accumulation,
bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from capture_helpers import Tiny, batch_grads, data, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_merge import Expert, StatisticsError
from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.formats.sidecar import Statistics

BETA2 = 0.99


def reference(batches, steps, model):
    """exp_avg_sq and the mean g² after `steps` optimizer steps cycling over `batches` at fixed weights."""
    grads = batch_grads(model, batches)
    v = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    mean = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for t in range(steps):
        g = grads[t % len(grads)]
        for n in v:
            v[n] = BETA2 * v[n] + (1 - BETA2) * g[n] ** 2
            mean[n] += g[n] ** 2 / steps
    return v, mean


def fixed_batches(n=32, bs=8):
    x, y = data(n)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def test_second_moments_and_batch_fisher_equal_hand_computation(tmp_path):
    model = Tiny(lr=0.0)
    capture = CurvatureCapture()
    trainer(tmp_path, [capture], max_epochs=2).fit(model, loader())
    v, mean = reference(fixed_batches(), 8, Tiny(lr=0.0))
    stats = Statistics.load(tmp_path / "final.statistics.safetensors")
    meta = stats.kinds
    assert meta["exp_avg_sq"]["beta2"] == BETA2 and meta["exp_avg_sq"]["step"] == 8
    assert meta["fisher.batch"]["count"] == 8 and meta["fisher.batch"]["batch_size"] == 8
    for name in v:
        torch.testing.assert_close(stats.raw(name, "exp_avg_sq"), v[name], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(stats.get(name, "exp_avg_sq"), v[name] / (1 - BETA2**8), rtol=1e-5, atol=1e-10)
        # stored per-example already: each step's g² weighted by its batch of 8 (a mean over examples)
        torch.testing.assert_close(stats.raw(name, "fisher", "batch"), 8 * mean[name], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(stats.get(name, "fisher", "batch"), 8 * mean[name], rtol=1e-5, atol=1e-10)
    # the final weights pair with the sidecar: an Expert finds it, names match the module's state_dict
    expert = Expert(tmp_path / "final.safetensors")
    assert set(expert.names()) == set(model.state_dict())
    torch.testing.assert_close(expert.statistic("net.0.weight", "fisher"), 8 * mean["net.0.weight"], rtol=1e-5, atol=0)
    # the fingerprint of the weights the fit started from is recorded
    fingerprint = json.loads(stats.metadata["base_fingerprint"])
    assert set(fingerprint) == set(v)
    # finalize() gives the same merge-ready values in memory, idempotently
    final = capture.finalize()
    assert final is capture.finalize()
    for name in v:
        torch.testing.assert_close(final.get(name, "exp_avg_sq"), stats.get(name, "exp_avg_sq"))


def test_gradient_accumulation_records_once_per_effective_batch(tmp_path):
    capture = CurvatureCapture(second_moments=False)
    trainer(tmp_path, [capture], max_epochs=1, accumulate_grad_batches=2).fit(Tiny(lr=0.0), loader())
    stats = capture.finalize()
    meta = stats.kinds["fisher.batch"]
    assert meta["count"] == 2 and meta["batch_size"] == 16  # 4 micro-batches of 8, two per step
    model = Tiny(lr=0.0)
    g = batch_grads(model, fixed_batches(bs=16))  # the mean loss of 16 examples = Lightning's averaged micro-losses
    for name in g[0]:
        expected = 16 * (g[0][name] ** 2 + g[1][name] ** 2) / 2  # w = (W·A)² / Σ B/N² = 4 / (2·8/64) = 16
        torch.testing.assert_close(stats.raw(name, "fisher", "batch"), expected, rtol=1e-5, atol=1e-10)


def test_start_step_every_n_and_ema(tmp_path):
    batches = fixed_batches()
    g = batch_grads(Tiny(lr=0.0), batches)
    capture = CurvatureCapture(second_moments=False, fisher_start_step=1, fisher_every_n_steps=2)
    trainer(
        tmp_path / "a",
        [capture],
        max_epochs=2,
    ).fit(Tiny(lr=0.0), loader())
    stats = capture.finalize()
    recorded = [1, 3, 5, 7]  # steps 1, 3, 5, 7 → batches 1, 3, 1, 3
    assert stats.kinds["fisher.batch"]["count"] == 4
    for name in g[0]:
        expected = 8 * sum(g[s % 4][name] ** 2 for s in recorded) / 4
        torch.testing.assert_close(stats.raw(name, "fisher", "batch"), expected, rtol=1e-5, atol=1e-10)

    decay = 0.5
    capture = CurvatureCapture(second_moments=False, fisher_ema_decay=decay)
    trainer(tmp_path / "b", [capture], max_epochs=1).fit(Tiny(lr=0.0), loader())
    stats = capture.finalize()
    for name in g[0]:
        ema = torch.zeros_like(g[0][name])
        for s in range(4):
            ema = decay * ema + (1 - decay) * 8 * g[s][name] ** 2
        torch.testing.assert_close(stats.raw(name, "fisher", "batch"), ema, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(stats.get(name, "fisher", "batch"), ema / (1 - decay**4), rtol=1e-5, atol=1e-10)


def test_parameter_groups_are_named_by_identity_not_position(tmp_path):
    model = Tiny(lr=0.0, optimizer="adamw-groups")
    capture = CurvatureCapture(fisher=False)
    trainer(tmp_path, [capture], max_epochs=1).fit(model, loader())
    stats = capture.finalize()
    grads = batch_grads(Tiny(lr=0.0), fixed_batches())
    for name in grads[0]:
        beta2 = 0.95 if name.startswith("net.2") else 0.99
        v = torch.zeros_like(grads[0][name])
        for s in range(4):
            v = beta2 * v + (1 - beta2) * grads[s][name] ** 2
        torch.testing.assert_close(stats.raw(name, "exp_avg_sq"), v, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(stats.get(name, "exp_avg_sq"), v / (1 - beta2**4), rtol=1e-5, atol=1e-10)
    assert stats.kinds["exp_avg_sq"]["beta2"] == {
        **{f"net.2.{k}": 0.95 for k in ("weight", "bias")},
        **{f"net.0.{k}": 0.99 for k in ("weight", "bias")},
    }


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    capture = CurvatureCapture(second_moments=False)
    trainer(tmp_path, [capture], max_epochs=1).fit(Tiny(lr=0.0, nonfinite_step=2), loader())
    stats = capture.finalize()
    meta = stats.kinds["fisher.batch"]
    assert meta["skipped_nonfinite"] == 1 and meta["count"] == 3
    g = batch_grads(Tiny(lr=0.0), fixed_batches())
    for name in g[0]:
        expected = 8 * (g[0][name] ** 2 + g[1][name] ** 2 + g[3][name] ** 2) / 3
        torch.testing.assert_close(stats.raw(name, "fisher", "batch"), expected, rtol=1e-5, atol=1e-10)
        assert torch.isfinite(stats.raw(name, "fisher", "batch")).all()


def test_sgd_has_no_second_moments(tmp_path):
    with pytest.raises(ValueError, match="SGD keeps no second moments"):
        trainer(tmp_path, [CurvatureCapture(fisher=False)], max_epochs=1).fit(Tiny(optimizer="sgd"), loader())
    capture = CurvatureCapture()
    with pytest.warns(UserWarning, match="capturing the Fisher only"):
        trainer(tmp_path, [capture], max_epochs=1).fit(Tiny(optimizer="sgd"), loader())
    assert not capture.finalize().has("exp_avg_sq") and capture.finalize().has("fisher")


def test_sidecars_follow_checkpoints_rotation_and_save_last(tmp_path):
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True, every_n_epochs=1
    )
    capture = CurvatureCapture()
    trainer(tmp_path, [capture, ckpt], max_epochs=4).fit(Tiny(lr=1e-2), loader(), loader())
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    ckpts = [f for f in files if f.endswith(".ckpt")]
    sidecars = [f for f in files if f.endswith(".statistics.safetensors") and f != "final.statistics.safetensors"]
    assert len(ckpts) == 3  # top 2 + last; the two rotated away took their sidecars with them
    assert sorted(c[: -len(".ckpt")] for c in ckpts) == sorted(s[: -len(".statistics.safetensors")] for s in sidecars)
    assert "final.safetensors" in files and "final.statistics.safetensors" in files
    for name in ckpts:
        path = tmp_path / "ckpt" / name
        expert = Expert(path)
        saved = torch.load(path, weights_only=True)
        step = saved["global_step"]
        assert expert.metadata["exp_avg_sq"]["step"] == step
        assert expert.statistics.metadata["global_step"] == str(step)
        # the sidecar holds the optimizer state saved in that very checkpoint
        opt_state = saved["optimizer_states"][0]["state"]
        torch.testing.assert_close(expert.statistics.raw("net.0.weight", "exp_avg_sq"), opt_state[0]["exp_avg_sq"])


def test_save_last_link_sidecar_is_found_through_the_link(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=1, save_last="link")
    trainer(tmp_path, [CurvatureCapture(), ckpt], max_epochs=2).fit(Tiny(lr=1e-2), loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink()
    expert = Expert(last)
    assert expert.has_statistic("exp_avg_sq") and expert.metadata["exp_avg_sq"]["step"] == 8


@pytest.mark.parametrize("compression", ["float32", "rank1"])
def test_resume_gives_the_statistics_of_an_uninterrupted_run(tmp_path, compression):
    full = CurvatureCapture(compression=compression)
    trainer(tmp_path / "full", [full], max_epochs=4).fit(Tiny(lr=1e-2), loader())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "part" / "ckpt", save_last=True)
    first = CurvatureCapture(compression=compression)
    trainer(tmp_path / "part", [first, ckpt], max_epochs=2).fit(Tiny(lr=1e-2), loader())
    second = CurvatureCapture(compression=compression)
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "part" / "ckpt2")
    trainer(tmp_path / "part", [second, ckpt2], max_epochs=4).fit(
        Tiny(lr=1e-2), loader(), ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt")
    )
    a, b = full.finalize(), second.finalize()
    assert a.kinds["fisher.batch"]["count"] == b.kinds["fisher.batch"]["count"] == 16
    for name in ("net.0.weight", "net.0.bias", "net.2.weight"):
        assert torch.equal(a.raw(name, "fisher", "batch"), b.raw(name, "fisher", "batch"))
        assert torch.equal(a.get(name, "exp_avg_sq"), b.get(name, "exp_avg_sq"))
    assert json.loads(a.metadata["base_fingerprint"]) == json.loads(b.metadata["base_fingerprint"])


def test_resume_without_the_sidecar_warns_and_restarts(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [CurvatureCapture(), ckpt], max_epochs=1).fit(Tiny(lr=1e-2), loader())
    os.remove(tmp_path / "ckpt" / "last.statistics.safetensors")
    capture = CurvatureCapture()
    with pytest.warns(UserWarning, match="restarts at step 4"):
        trainer(tmp_path, [capture], max_epochs=2).fit(
            Tiny(lr=1e-2), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    meta = capture.finalize().kinds["fisher.batch"]
    assert meta["count"] == 4 and meta["restarted_at"] == 4


def test_renamed_parameters_on_resume_are_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [CurvatureCapture(), ckpt], max_epochs=1).fit(Tiny(lr=1e-2), loader())
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items()}
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("CurvatureCapture"))
    counts = state["fisher"]["counts"]
    state["fisher"]["counts"] = {"body.0.weight" if k == "net.0.weight" else k: c for k, c in counts.items()}
    torch.save(saved, path)
    with pytest.raises(StatisticsError, match="parameter names changed"):
        trainer(tmp_path, [CurvatureCapture()], max_epochs=2).fit(Tiny(lr=1e-2), loader(), ckpt_path=str(path))


def test_mismatched_or_corrupted_sidecars_are_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [CurvatureCapture(), ckpt], max_epochs=1).fit(Tiny(lr=1e-2), loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    sidecar = tmp_path / "ckpt" / "last.statistics.safetensors"
    # a sidecar for another model: names the checkpoint does not have
    other = torch.load(last, weights_only=True)
    other["state_dict"] = {k.replace("net.", "body."): v for k, v in other["state_dict"].items()}
    torch.save(other, tmp_path / "ckpt" / "other.ckpt")
    os.link(sidecar, tmp_path / "ckpt" / "other.statistics.safetensors")
    with pytest.raises(StatisticsError, match="do not match expert"):
        Expert(tmp_path / "ckpt" / "other.ckpt")
    # truncated
    data_ = sidecar.read_bytes()
    sidecar.write_bytes(data_[: len(data_) // 2])
    with pytest.raises(StatisticsError, match="truncated or corrupted"):
        Expert(last)


def test_frozen_parameters_have_no_statistics_and_unfrozen_ones_count_their_own_steps(tmp_path):
    class Unfreeze(Tiny):
        def on_train_epoch_start(self):
            for p in self.net[0].parameters():
                p.requires_grad_(self.current_epoch >= 1)

    capture = CurvatureCapture()
    trainer(tmp_path, [capture], max_epochs=2).fit(Unfreeze(lr=1e-2), loader())
    stats = capture.finalize()
    counts = stats.kinds["fisher.batch"]["count"]
    assert counts == {"net.0.weight": 4, "net.0.bias": 4, "net.2.weight": 8, "net.2.bias": 8}
    steps = stats.kinds["exp_avg_sq"]["step"]
    assert steps == {"net.0.weight": 4, "net.0.bias": 4, "net.2.weight": 8, "net.2.bias": 8}


def test_compression_sizes_and_values(tmp_path):
    sizes = {}
    for compression in ("float32", "bfloat16", "rank1"):
        capture = CurvatureCapture(compression=compression)
        trainer(tmp_path / compression, [capture], max_epochs=1).fit(Tiny(lr=1e-2), loader())
        path = tmp_path / compression / "final.statistics.safetensors"
        stats = Statistics.load(path)
        sizes[compression] = sum(stats._tensors[k].nbytes for k in stats.keys())  # payload; metadata aside
        exact = capture.finalize()
        for name in ("net.0.weight", "net.2.bias"):
            got, want = stats.get(name, "exp_avg_sq"), exact.get(name, "exp_avg_sq")
            if compression == "float32":
                assert torch.equal(got, want)
            elif compression == "bfloat16":
                torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
            elif want.dim() == 2:  # rank-1: row and column sums kept
                torch.testing.assert_close(got.sum(1), want.sum(1), rtol=1e-5, atol=1e-12)
                torch.testing.assert_close(got.sum(0), want.sum(0), rtol=1e-5, atol=1e-12)
            else:
                assert torch.equal(got, want)
        assert stats.kinds["exp_avg_sq"]["compression"] == compression
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    # 4×5 and 3×5 weights become 4+5 and 3+5 sums; biases stay: (9 + 5 + 8 + 3) vs (20 + 5 + 15 + 3) floats per kind
    assert sizes["rank1"] * 43 == sizes["float32"] * 25


def test_peft_adapter_statistics_are_keyed_like_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    import lightning.pytorch as pl
    import torch.nn.functional as F

    class LoraTiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            base = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
            config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
            self.model = peft.get_peft_model(base, config)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = LoraTiny()
    capture = CurvatureCapture()
    trainer(tmp_path, [capture], max_epochs=1).fit(module, loader())
    folder = tmp_path / "adapter"
    module.model.save_pretrained(folder)
    capture.save_adapter_statistics(module.model, folder)
    from safetensors.torch import load_file

    adapter_keys = set(load_file(folder / "adapter_model.safetensors"))
    stats = Statistics.load(folder / "statistics.safetensors")
    assert set(stats.names("exp_avg_sq")) == adapter_keys == set(stats.names("fisher"))
    key = next(k for k in adapter_keys if "lora_A" in k)
    module_name = "model." + key.replace(".lora_A.weight", ".lora_A.default.weight")
    torch.testing.assert_close(stats.get(key, "exp_avg_sq"), capture.finalize().get(module_name, "exp_avg_sq"))
    peft.PeftModel.from_pretrained(
        torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)), folder
    )  # the extra file does not disturb PEFT


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="records nothing"):
        CurvatureCapture(second_moments=False, fisher=False)
    with pytest.raises(ValueError, match="compression"):
        CurvatureCapture(compression="int8")
    with pytest.raises(ValueError, match="fisher_ema_decay"):
        CurvatureCapture(fisher_ema_decay=1.0)
    with pytest.raises(ValueError, match="fisher_after_fit"):
        CurvatureCapture(fisher_after_fit="sampled")


def test_export_second_moments_in_the_ota_convention(tmp_path):
    from safetensors.torch import load_file

    from lightning_merge.cli.commands import main
    from lightning_merge.formats.sidecar import export_second_moments

    capture = CurvatureCapture()
    trainer(tmp_path, [capture], max_epochs=1).fit(Tiny(lr=1e-2), loader())
    out = tmp_path / "exp_avg_sq.safetensors"
    assert main(["export-second-moments", str(tmp_path / "final.safetensors"), str(out), "--strip-prefix", "net."]) == 0
    exported = load_file(out)
    assert set(exported) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    final = capture.finalize()
    assert torch.equal(exported["0.weight"], final.raw("net.0.weight", "exp_avg_sq"))
    corrected = load_file(export_second_moments(final, tmp_path / "c.safetensors", bias_correct=True))
    assert torch.equal(corrected["net.2.bias"], final.get("net.2.bias", "exp_avg_sq"))
    assert main(["export-second-moments", str(tmp_path / "nothing.ckpt"), str(out)]) == 2


class _Batch:
    """A custom batch object whose length cannot be read."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class _CustomBatchModel(Tiny):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch.x), batch.y)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch


class _CountedCustomBatchModel(_CustomBatchModel):
    def fisher_counts(self, batch):
        return len(batch.y), len(batch.y)


def _custom_loader():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data(32)
    return DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=lambda items: _Batch(
        torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])))


def test_a_batch_whose_size_cannot_be_read_is_an_error_not_a_zero_fisher(tmp_path):
    with pytest.raises(TypeError, match="fisher_counts"):
        trainer(tmp_path / "a", [CurvatureCapture()], max_epochs=1).fit(_CustomBatchModel(lr=0.0), _custom_loader())
    capture = CurvatureCapture(second_moments=False)
    trainer(tmp_path / "b", [capture], max_epochs=1).fit(_CountedCustomBatchModel(lr=0.0), _custom_loader())
    stats = capture.finalize()
    assert stats.kinds["fisher.batch"]["batch_size"] == 8
    g = batch_grads(Tiny(lr=0.0), [(b.x, b.y) for b in _custom_loader()])
    for name in g[0]:
        expected = 8 * sum(step[name] ** 2 for step in g) / 4
        torch.testing.assert_close(stats.get(name, "fisher", "batch"), expected, rtol=1e-5, atol=1e-10)
