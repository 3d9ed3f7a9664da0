"""Issue 27, item 16: a statistic that would be invalid is left out with a warning when it is recorded (or made
valid), never found invalid when the run's capture is written at its end. Before: ``CurvatureCapture(gram="train")``
over a pretrained encoder failed with "metadata gram.count = 0 is not in (0.0, inf); the sidecar is invalid" at the
first checkpoint, and an empty post-fit loader lost final.safetensors."""

from __future__ import annotations

import pytest
import torch
from capture_helpers import Tiny, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_merge import Expert, RegMean, merge
from lightning_merge.callbacks import CurvatureCapture


def _capture_module(kind: str):
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch import nn

    class Classifier(pl.LightningModule):
        """An encoder (two linear layers) under a linear head, as a pretrained model under a new head."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
            self.head = nn.Linear(5, 3)
            if kind == "pretrained in eval mode":
                self.encoder.eval()  # as transformers' from_pretrained returns it; Lightning keeps the mode

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.encoder(x)
            logits = F.linear(h, self.head.weight, self.head.bias) if kind == "head outside hooks" else self.head(h)
            return F.cross_entropy(logits, y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Classifier()


def test_gram_capture_counts_layers_a_pretrained_model_left_in_eval_mode(tmp_path):
    """The MiniLM report: transformers' from_pretrained returns the encoder in eval mode, Lightning keeps that mode,
    and the capture counted only forwards of modules in training mode: the encoder's layers saw 0 rows and the whole
    capture failed when the first sidecar was written."""
    capture = CurvatureCapture(gram="train")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [capture, ckpt], max_epochs=2).fit(_capture_module("pretrained in eval mode"), loader(32, 8))
    stats = Expert(tmp_path / "ckpt" / "final.safetensors").statistics
    assert stats.kinds["gram"]["count"] == {"encoder.0.weight": 64, "encoder.2.weight": 64, "head.weight": 64}
    x = torch.cat([b[0] for b in loader(32, 8)])
    torch.testing.assert_close(stats.get("encoder.0.weight", "gram"), x.T @ x / 32, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "ckpt" / "last.statistics.safetensors").exists()


def test_gram_capture_leaves_out_a_layer_its_hooks_never_see(tmp_path):
    capture = CurvatureCapture(gram="train")
    with pytest.warns(UserWarning, match="no training forward reached 'head.weight': its forward hook never ran"):
        trainer(tmp_path, [capture], max_epochs=1).fit(_capture_module("head outside hooks"), loader(32, 8))
    final = tmp_path / "final.safetensors"
    stats = Expert(final).statistics
    assert set(stats.kinds["gram"]["count"]) == {"encoder.0.weight", "encoder.2.weight"}
    assert stats.has("exp_avg_sq") and stats.has("fisher")
    merged = merge([final, final], None, RegMean())  # the head has no Gram matrix in any expert: its mean
    torch.testing.assert_close(merged["head.weight"], Expert(final).tensor("head.weight"))


@pytest.mark.parametrize("gram", [None, "after_fit"])
def test_a_post_fit_pass_over_no_example_is_left_out_with_a_warning(tmp_path, gram):
    capture = CurvatureCapture(fisher_after_fit="example", fisher_loader=[], gram=gram)
    with pytest.warns(UserWarning, match="fisher_loader gave no example; the post-fit Fisher is left out"):
        trainer(tmp_path, [capture], max_epochs=1).fit(Tiny(lr=1e-2), loader(32, 8))
    stats = Expert(tmp_path / "final.safetensors").statistics
    assert sorted(stats.kinds) == ["exp_avg_sq", "fisher.batch"]


def test_second_moments_before_any_update_are_left_out():
    from lightning_merge.capture.second_moments import read_second_moments

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    optimizer.state[layer.bias]["step"] = torch.tensor(0.0)  # state created, never updated (a custom optimizer)
    names = {id(layer.weight): "weight", id(layer.bias): "bias"}
    values, meta = read_second_moments([optimizer], names)
    assert set(values) == {"weight"} and meta["step"] == 1 and meta["unstepped"] == ["bias"]
