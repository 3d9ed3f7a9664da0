"""The variance-collapse correction: identity where merged equals expert, matched moments after correction,
save/load, task switching, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.tools.variance import VarianceCorrection


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _loader(seed: int, n: int = 96, shift: float = 0.0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) + shift
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=32)


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach())) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_identity_when_merged_equals_expert():
    model = _mlp(0)
    expert = copy.deepcopy(model)
    loader = _loader(1)
    vc = VarianceCorrection.fit(model, {"a": expert}, {"a": loader}, layers=["0", "2"]).attach(model)
    x = torch.randn(10, 6)
    with torch.no_grad():
        plain = expert(x)
        with vc.task("a"):
            corrected = model(x)
    torch.testing.assert_close(corrected, plain, atol=1e-5, rtol=1e-5)
    scale, shift = vc.affine("a", "2")
    torch.testing.assert_close(scale, torch.ones_like(scale), atol=1e-5, rtol=0)
    torch.testing.assert_close(shift, torch.zeros_like(shift), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sequential", [True, False])
def test_corrected_layers_match_the_expert_moments(sequential):
    merged, expert = _mlp(0), _mlp(1)
    loader = _loader(2)
    x = torch.cat([b[0] for b in loader])
    layers = ["0", "2", "4"]
    vc = VarianceCorrection.fit(merged, {"a": expert}, {"a": loader}, layers=layers, eps=0.0,
                                sequential=sequential).attach(merged)
    want = _outputs(expert, layers, x)
    with vc.task("a"):
        got = _outputs(merged, layers, x)
    checked = layers if sequential else layers[:1]  # one pass: only the first layer sees uncorrected inputs
    for name in checked:
        torch.testing.assert_close(got[name].mean(0), want[name].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[name].var(0, unbiased=False), want[name].var(0, unbiased=False),
                                   atol=1e-4, rtol=1e-3)
    # the formula, per channel, on the first layer
    s = vc.stats["a"]["0"]
    raw = merged[0](x)
    manual = (raw - s["merged_mean"]) / s["merged_var"].sqrt() * s["expert_var"].sqrt() + s["expert_mean"]
    torch.testing.assert_close(got["0"], manual.detach(), atol=1e-5, rtol=1e-5)


def test_tasks_switch_and_no_task_is_identity(tmp_path):
    merged, ea, eb = _mlp(0), _mlp(1), _mlp(2)
    vc = VarianceCorrection.fit(merged, {"a": ea, "b": eb}, {"a": _loader(3), "b": _loader(4, shift=1.0)},
                                layers="*").attach(merged)  # a glob: every submodule
    assert vc.layers == ["0", "1", "2", "3", "4"]
    x = torch.randn(5, 6)
    with torch.no_grad():
        vc.detach()
        plain = merged(x)
        vc.attach(merged)
        none = merged(x)
        with vc.task("a"):
            out_a = merged(x)
        with vc.task("b"):
            out_b = merged(x)
    torch.testing.assert_close(none, plain)
    assert not torch.allclose(out_a, out_b)
    path = vc.save(tmp_path)
    assert path.name == "variance_correction.safetensors"
    loaded = VarianceCorrection.load(tmp_path).attach(merged)
    assert loaded.tasks == ["a", "b"] and loaded.layers == vc.layers
    with torch.no_grad(), loaded.task("b"):
        torch.testing.assert_close(merged(x), out_b)
    with pytest.raises(KeyError, match="tasks"):
        loaded.set_task("c")


def test_conv_channels_are_dimension_one():
    torch.manual_seed(0)
    merged = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU())
    expert = copy.deepcopy(merged)
    with torch.no_grad():
        expert[0].weight.mul_(2.0)
    loader = DataLoader(TensorDataset(torch.randn(16, 2, 6, 6)), batch_size=8)
    vc = VarianceCorrection.fit(merged, {"a": expert}, {"a": loader}, layers=["0"], eps=0.0).attach(merged)
    assert vc.channel_dims == {"0": 1}
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad(), vc.task("a"):
        got = merged[0](x)
    want = expert[0](x).detach()
    torch.testing.assert_close(got.mean((0, 2, 3)), want.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.std((0, 2, 3)), want.std((0, 2, 3)), atol=1e-4, rtol=1e-3)


def test_bad_input(tmp_path):
    merged = _mlp(0)
    with pytest.raises(ValueError, match="no module .* matches layer 'encoder.9'"):
        VarianceCorrection.fit(merged, {"a": _mlp(1)}, {"a": _loader(0)}, layers=["encoder.9"])
    with pytest.raises(ValueError, match="same tasks"):
        VarianceCorrection.fit(merged, {"a": _mlp(1)}, {"b": _loader(0)}, layers=["0"])
    with pytest.raises(RuntimeError, match="empty"):
        VarianceCorrection.fit(merged, {"a": _mlp(1)}, {"a": []}, layers=["0"])
    bad = tmp_path / "variance_correction.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        VarianceCorrection.load(tmp_path)


def test_works_inside_a_lightning_module_with_trainer_validate():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.net = _mlp(seed)

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            self.log("out_mean", self(x).mean(), batch_size=len(x))

    merged, expert = Module(0), Module(1)
    loader = _loader(5)
    vc = VarianceCorrection.fit(merged, {"a": expert}, {"a": loader}, layers=["net.0", "net.2"]).attach(merged)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    plain = trainer.validate(merged, loader, verbose=False)[0]["out_mean"]
    with vc.task("a"):
        corrected = trainer.validate(merged, loader, verbose=False)[0]["out_mean"]
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        assert plain == pytest.approx(float(merged(x).mean()), abs=1e-5)
        with vc.task("a"):
            assert corrected == pytest.approx(float(merged(x).mean()), abs=1e-5)
    assert abs(corrected - plain) > 1e-3
