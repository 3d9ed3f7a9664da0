"""Capture curvature while fine-tuning one digits expert, then read it back.

    python examples/capture_digits.py [OUT_DIR]

Trains a small MLP on scikit-learn's digits with Adam, `CurvatureCapture` and a `ModelCheckpoint` keeping the
two best epochs, then lists the files written and prints, per parameter, the merge-ready second moments and
Fisher estimates read back through `Expert`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import Expert
from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.cli.demo import load_digits_splits, make_backbone, quiet_lightning


class Digits(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = make_backbone()
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(out: Path) -> None:
    quiet_lightning()
    pl.seed_everything(0, verbose=False)
    splits = load_digits_splits()
    train = DataLoader(TensorDataset(*splits["train"]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*splits["val"]), batch_size=64)
    capture = CurvatureCapture(fisher_after_fit="example", fisher_examples=256)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[capture, ModelCheckpoint(dirpath=out / "checkpoints", monitor="val_loss", save_top_k=2)],
    )
    trainer.fit(Digits(), train, val)

    print("files written:")
    for path in sorted((out / "checkpoints").iterdir()):
        print(f"  {path.name:45s} {path.stat().st_size / 1e3:8.1f} kB")

    expert = Expert(out / "checkpoints" / "final.safetensors")
    print(f"\n{'parameter':22s}{'mean v̂':>12s}{'mean F batch':>14s}{'mean F example':>16s}")
    for name in expert.names():
        v = expert.statistic(name, "exp_avg_sq").mean()
        fb = expert.statistic(name, "fisher", estimator="batch").mean()
        fe = expert.statistic(name, "fisher", estimator="example").mean()
        print(f"{name:22s}{v:12.3e}{fb:14.3e}{fe:16.3e}")
    print(
        "\nrecorded:",
        {k: {m: v for m, v in meta.items() if not isinstance(v, (dict, list))} for k, meta in expert.metadata.items()},
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="capture-digits-")))
