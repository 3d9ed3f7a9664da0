"""What CurvatureCapture costs a sharded fine-tune: a causal LM (a random Llama from a config, no download) sharded
with FSDP2 (``fully_shard`` per decoder layer and the whole model, in ``configure_model``) under Lightning's
``ModelParallelStrategy`` on 2 CPU processes (gloo), with and without the callback, in interleaved rounds of one run.

Prints per rank: the median step time with and without capture (second moments + token-aware batch Fisher) and
their ratio, and the memory: the peak resident-memory rise of each fit over the process's resident memory when the
fit starts, with and without capture, their difference, and what the target allows (this rank's shard of the model
and of the statistics, plus the largest full tensor, gathered once while a sidecar is written). Every fit also saves
one checkpoint with its sidecar, so the gathered write is inside the measured peak.

    python benchmarks/fsdp_capture.py [--steps 30] [--rounds 3] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

PARSER = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
PARSER.add_argument("--steps", type=int, default=30)
PARSER.add_argument("--rounds", type=int, default=3)
PARSER.add_argument("--hidden", type=int, default=256)
PARSER.add_argument("--layers", type=int, default=4)
PARSER.add_argument("--vocab", type=int, default=2048)
PARSER.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
PARSER.add_argument("--length", type=int, default=64)
ARGS = PARSER.parse_args()


class Tokens(Dataset):
    """Random token sequences with −100 padding at the end of some (the token-aware Fisher counts real tokens)."""

    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        self.labels = self.ids.clone()
        for i, k in enumerate(lengths.tolist()):
            self.labels[i, k:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class ShardedLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=ARGS.vocab, hidden_size=ARGS.hidden, intermediate_size=ARGS.hidden * 2,
                             num_hidden_layers=ARGS.layers, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=ARGS.length)
        self.model = LlamaForCausalLM(config)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Probe(pl.Callback):
    """Step times after a warm-up, and the peak resident memory of the fit (sampled every 5 ms) above the resident
    memory at fit start."""

    def __init__(self, skip: int = 3):
        self.skip, self.times, self._t = skip, [], 0.0
        self.start_rss = self.peak_rss = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(0.005)

    def on_fit_start(self, trainer, pl_module):
        self.start_rss = self.peak_rss = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_fit_end(self, trainer, pl_module):
        self._stop.set()
        self._thread.join()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)


HOOK_TIME = {"seconds": 0.0, "steps": 0}


def _timed(method):
    """A CurvatureCapture hook that adds its own time to HOOK_TIME (the capture's per-step cost, apart from noise)."""
    def wrapped(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            HOOK_TIME["seconds"] += time.perf_counter() - t0
    return wrapped


def fit(root: Path, capture: bool) -> tuple[Probe, ShardedLM, object]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_merge.callbacks import CurvatureCapture

    for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_after_backward"):
        original = getattr(CurvatureCapture, hook)
        if not getattr(original, "__timed__", False):
            setattr(CurvatureCapture, hook, _timed(original))
            getattr(CurvatureCapture, hook).__timed__ = True
    probe = Probe()
    recorder = CurvatureCapture(save_final=False) if capture else None
    callbacks = [probe, ModelCheckpoint(dirpath=str(root / "ck"), every_n_train_steps=ARGS.steps, save_top_k=1)]
    trainer = pl.Trainer(default_root_dir=str(root), max_steps=ARGS.steps, accelerator="cpu", devices=2,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         callbacks=callbacks + ([recorder] if recorder else []), logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = ShardedLM()
    data = Tokens(ARGS.batch * 2 * (ARGS.steps + 1), ARGS.length, ARGS.vocab)
    trainer.fit(module, DataLoader(data, batch_size=ARGS.batch))
    return probe, module, recorder


def main() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    root = Path(os.environ.get("FSDP_BENCH_ROOT") or tempfile.mkdtemp(prefix="fsdp-capture-"))
    times = {False: [], True: []}
    rises = {False: [], True: []}
    module = recorder = None
    for capture in (False, True):  # a warm-up of each (imports, the allocator's first growth), not counted
        fit(root / f"warm-{capture}", capture)
    HOOK_TIME["seconds"] = 0.0
    for r in range(ARGS.rounds):  # interleaved: the machine's drift hits both alike
        for capture in (False, True):
            probe, module, got = fit(root / f"{'cap' if capture else 'base'}{r}", capture)
            HOOK_TIME["steps"] += ARGS.steps if capture else 0
            times[capture] += probe.times
            rises[capture].append(probe.peak_rss - probe.start_rss)
            recorder = got or recorder
    rank = torch.distributed.get_rank()
    shard = sum(p.to_local().numel() * p.to_local().element_size() for p in module.parameters())
    whole = sum(p.numel() * p.element_size() for p in module.parameters())
    largest = max(p.numel() * 4 for p in module.parameters())  # a gathered tensor, float32
    kinds = 2  # exp_avg_sq is the optimizer's own; the batch Fisher adds one float32 shard per parameter
    allowed = shard * (kinds - 1) + largest  # the capture's own: the Fisher accumulators' shard + one full tensor
    held = sum(t.numel() * t.element_size() for t in recorder._recorder.batch_fisher.acc.values())
    b, c = statistics.median(times[False]), statistics.median(times[True])
    mib = 1 << 20
    lines = [
        f"rank {rank}: Llama {ARGS.layers}x{ARGS.hidden}, vocab {ARGS.vocab}: {whole / mib:.1f} MiB of float32 "
        f"parameters, this rank's shard {shard / mib:.1f} MiB, largest tensor {largest / mib:.1f} MiB; "
        f"{ARGS.batch} sequences x {ARGS.length} tokens per rank per step, {len(times[False])} timed steps each",
        f"rank {rank}: step time  without {b * 1e3:7.1f} ms   with {c * 1e3:7.1f} ms   ratio {c / b:.3f}",
        f"rank {rank}: the capture's hooks take {HOOK_TIME['seconds'] / max(HOOK_TIME['steps'], 1) * 1e3:.1f} ms "
        "per step (their own time, measured inside them)",
        f"rank {rank}: peak RSS rise  without {statistics.median(rises[False]) / mib:6.1f} MiB   with "
        f"{statistics.median(rises[True]) / mib:6.1f} MiB   capture's extra "
        f"{(statistics.median(rises[True]) - statistics.median(rises[False])) / mib:6.1f} MiB   target <= "
        f"{allowed / mib:.1f} MiB (its Fisher shard + one gathered tensor); the Fisher accumulators it holds: "
        f"{held / mib:.1f} MiB",
    ]
    for line in lines:
        print(line, flush=True)


if __name__ == "__main__":
    main()
