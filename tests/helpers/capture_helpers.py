"""Tiny Lightning modules and data for the capture tests (importable by ddp_spawn workers)."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    x, y = data(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class RankInterleaved(torch.utils.data.Sampler):
    """Rank r reads examples r, r + W, r + 2W... in order (Lightning's own DistributedSampler shuffles training
    data), so W processes with batch b see the same global batches as one process with batch W·b."""

    def __init__(self, n: int):
        self.n = n

    def _world(self) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._world()
        return len(range(rank, self.n, world))


def ddp_loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    x, y = data(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=RankInterleaved(n))


class Tiny(pl.LightningModule):
    """A 4→5→3 MLP classifier with Adam (β₂ = 0.99 so bias correction is visible in short runs)."""

    def __init__(self, lr: float = 0.0, optimizer: str = "adam", seed: int = 0, nonfinite_step: int = -1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.lr = lr
        self.optimizer_name = optimizer
        self.nonfinite_step = nonfinite_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == self.nonfinite_step:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook: stands in for AMP's skip
        if self.global_step == self.nonfinite_step:
            for p in self.parameters():
                p.grad.nan_to_num_(0.0, 0.0, 0.0)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y) + 0.01 * self.current_epoch)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adamw-groups":  # reordered groups: the head first, then the body
            return torch.optim.AdamW(
                [
                    {"params": self.net[2].parameters(), "betas": (0.9, 0.95)},
                    {"params": self.net[0].parameters()},
                ],
                lr=self.lr,
                betas=(0.9, 0.99),
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.99))


class SaveRankWeights(pl.Callback):
    """Saves each rank's final weights to ``{folder}/rank{r}.pt``, to check that every rank ends equal."""

    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {k: v.cpu() for k, v in pl_module.state_dict().items()}, f"{self.folder}/rank{trainer.global_rank}.pt"
        )


def close_process_group() -> None:
    """Test infrastructure: end a script that ran a sharded (ModelParallelStrategy) fit with its process group
    destroyed, every rank having arrived. Without it torch 2.13's gloo aborts at interpreter exit now and then
    ("terminate called without an active exception", SIGABRT) after the script's work is done and written (see
    :class:`CloseProcessGroup`); seen twice in full-suite runs of these tests (the post-fit and capture scripts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class CloseProcessGroup(pl.Callback):
    """Test infrastructure, not library behaviour: leave a ``ddp_spawn`` worker with its process group destroyed.

    A spawned worker exits without Lightning's at-exit ``destroy_process_group`` (multiprocessing ends children with
    ``os._exit``), and with torch 2.13's gloo a worker then aborts at exit now and then ("terminate called without
    an active exception", SIGABRT), after the fit has finished and been checked. Measured with a plain Lightning
    ``ddp_spawn`` fit and no lightning-merge code: 1 abort in 22 runs (and 1 in 14 runs of the DDP Fisher test, the
    failure CI hit); with this callback: none in 45 runs of the plain fit."""

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if stage == "fit" and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    quiet()
    if kwargs.get("strategy") == "ddp_spawn":
        callbacks = [*callbacks, CloseProcessGroup()]
    options = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def batch_grads(model: nn.Module, batches) -> list[dict[str, torch.Tensor]]:
    """Gradient of the mean loss of each batch (a list of (x, y)), at the model's current weights."""
    out = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


import dataclasses  # noqa: E402

from lightning_merge.strategies import Strategy  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ExplodingStrategy(Strategy):
    """A strategy that fails on every tensor: rank 0 raises inside a merge callback (the other ranks must not hang)."""

    name = "test_exploding"
    needs_base = False

    def merge_tensor(self, name, base, tensors, stats, prepared=None):
        raise RuntimeError("boom at rank zero")


# -- a tiny causal language model (Hugging Face Llama), optionally with LoRA ---------------------------------------


def lm_examples(n: int, seed: int = 0, vocab: int = 32, min_len: int = 6, max_len: int = 16) -> list[dict]:
    """``n`` token sequences of varied lengths (so steps hold different numbers of predicted tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, vocab, (length,), generator=g)})
    return out


def pad_lm(items: list[dict]) -> dict:
    """Pad to the longest sequence: input_ids with 0, labels with -100 (ignored by the loss), an attention mask."""
    width = max(len(i["input_ids"]) for i in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["input_ids"]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loader(n: int = 8, batch_size: int = 1, seed: int = 0) -> DataLoader:
    return DataLoader(lm_examples(n, seed), batch_size=batch_size, shuffle=False, collate_fn=pad_lm)


def tiny_llama_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


class TinyLM(pl.LightningModule):
    """A tiny Llama trained with Hugging Face's token-mean causal-LM loss; ``lora`` wraps it with PEFT."""

    def __init__(self, lr: float = 0.0, lora: bool = False, seed: int = 0, base_path: str | None = None):
        super().__init__()
        import transformers

        torch.manual_seed(seed)
        model = (transformers.LlamaForCausalLM.from_pretrained(base_path) if base_path
                 else transformers.LlamaForCausalLM(tiny_llama_config()))
        if lora:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
        self.model = model
        self.lr = lr

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr, betas=(0.9, 0.99))


def lm_ddp_loader(n: int = 8, seed: int = 0) -> DataLoader:
    """One sequence per rank and step: rank r reads sequences r, r + W... (RankInterleaved)."""
    return DataLoader(lm_examples(n, seed), batch_size=1, sampler=RankInterleaved(n), collate_fn=pad_lm)


class TinyData(pl.LightningDataModule):
    """Train and validation loaders of the tiny classifier, for LightningCLI configs."""

    def __init__(self, n: int = 32, batch_size: int = 8):
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def train_dataloader(self):
        return loader(self.n, self.batch_size)

    def val_dataloader(self):
        return loader(16, 8, seed=1)


class CountSteps(pl.Callback):
    """Counts training batches (to show a check ran before any)."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


from lightning_merge.strategies import Linear  # noqa: E402


class _ExplodingFold:
    quantities = (("sum", torch.float32),)

    def begin(self, index, expert, names):
        from lightning_merge.strategies import FoldContext

        return FoldContext(index, 1.0)

    def fold(self, *args, **kwargs):
        raise RuntimeError("boom while folding")


@dataclasses.dataclass(frozen=True)
class ExplodingFoldStrategy(Linear):
    """A continual strategy whose fold fails (only rank 0 folds)."""

    name = "test_exploding_fold"

    def continual_form(self):
        return _ExplodingFold()


class NegativeValTiny(Tiny):
    """Logs a negative validation metric: metrics-weighted averaging refuses it (on rank 0, which averages)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_score", -F.cross_entropy(self(x), y), sync_dist=True)
