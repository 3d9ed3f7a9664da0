"""Checkpoint averaging on a small real fine-tune: test accuracy of the last checkpoint, the EMA, and averages of
the run's checkpoints (uniform top-k, MWA, Fisher-weighted, OTA-weighted), mean ± std over seeds.

The fine-tune: the digits backbone pre-trained on 500 images (10-way), fine-tuned with its head on 10-way digit
classification of rotated images (800 images), Adam lr 3e-3 for 20 epochs, with EMAWeightAveraging (decay 0.9),
CurvatureCapture, and ModelCheckpoint keeping the 5 best epochs by validation loss. The averages use the raw
weights each checkpoint keeps (``current_model_state``); `last.ckpt` gives the last epoch's raw and EMA weights.

    python benchmarks/checkpoint_averaging.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.callbacks import CurvatureCapture
from lightning_merge.cli.demo import TASKS, load_digits_splits, make_backbone, quiet_lightning, task_data
from lightning_merge.tools.averaging import average_checkpoints, read_info, select_checkpoints


class Classifier(pl.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(128, 10)
        self.lr = lr

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def accuracy(state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model = Classifier(make_backbone(), 0.0)
    model.load_state_dict(state)
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(seed: int, root: Path, epochs: int) -> dict[str, float]:
    quiet_lightning()
    splits = load_digits_splits(seed)
    torch.manual_seed(seed)
    base = make_backbone()
    pre = Classifier(base, 3e-3)
    pl.seed_everything(seed, verbose=False)
    pl.Trainer(
        max_epochs=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(pre, DataLoader(TensorDataset(*splits["pretrain"]), batch_size=32, shuffle=True))
    task = TASKS[3]  # the digit, on rotated images
    model = Classifier(base, 3e-3)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", monitor="val_loss", save_top_k=5, save_last=True)
    train = DataLoader(TensorDataset(*task_data(task, splits["train"])), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*task_data(task, splits["val"])), batch_size=256)
    pl.seed_everything(seed + 1, verbose=False)
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        callbacks=[EMAWeightAveraging(decay=0.9), CurvatureCapture(save_final=False), ckpt],
    ).fit(model, train, val)
    x, y = task_data(task, splits["test"])
    files = sorted(str(p) for p in (root / "ckpt").glob("*.ckpt") if p.stem != "last")
    infos = [read_info(f) for f in files]
    last = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    out = {
        "last checkpoint (raw weights)": accuracy(last["current_model_state"], x, y),
        "EMA (decay 0.9), last checkpoint": accuracy(last["state_dict"], x, y),
    }
    top = [str(i.path) for i in select_checkpoints(infos, select="top_k", k=5, mode="min")]
    for name, kwargs in {
        "uniform top-5": dict(weighting="uniform"),
        "MWA top-5 (val loss, p=1)": dict(weighting="mwa", p=1.0),
        "MWA top-5 (val loss, p=4)": dict(weighting="mwa", p=4.0),
        "Fisher-weighted top-5": dict(weighting="fisher"),
        "OTA-weighted top-5": dict(weighting="ota"),
    }.items():
        state, _ = average_checkpoints(top, None, source="current_model_state", **kwargs)
        out[name] = accuracy(state, x, y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    results = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(seed, Path(tmp), args.epochs))
    print(f"digits (rotated), fine-tune of a pre-trained backbone, {args.seeds} seeds: test accuracy (mean ± std)")
    for name in results[0]:
        values = [100 * r[name] for r in results]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:34s}{statistics.mean(values):7.2f} ± {std:4.2f}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
