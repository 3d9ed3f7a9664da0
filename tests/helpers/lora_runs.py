"""LoRA runs as docs/lora.md shows them: a tiny Llama from a config, PEFT LoRA (r = 4 on q_proj / v_proj) inside a
LightningModule that defines no ``forward`` (its steps call ``self.model(input_ids=..., labels=...)``), token tasks
with Hugging Face's token-mean loss and -100 padding."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

VOCAB = 64


def llama_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def save_base(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama base model saved as Hugging Face saves one."""
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(folder)
    return folder


def task_examples(task: int, n: int, seed: int = 0) -> list[dict]:
    """Sequences of task ``task``: each token is the previous one plus ``task + 1`` (mod the vocabulary), of varied
    lengths (so padded batches hold different numbers of predicted tokens)."""
    g = torch.Generator().manual_seed(seed + 100 * task)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        ids = (start + (task + 1) * torch.arange(length)) % (VOCAB - 1) + 1
        out.append({"input_ids": ids})
    return out


def pad(items: list[dict]) -> dict:
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


def task_loader(task: int, n: int = 8, batch_size: int = 2, seed: int = 0) -> DataLoader:
    return DataLoader(task_examples(task, n, seed), batch_size=batch_size, shuffle=False, collate_fn=pad)


class LoraLM(pl.LightningModule):
    """The docs/lora.md pattern: ``self.model = get_peft_model(...)``, no ``forward``."""

    def __init__(self, base: str | Path, lr: float = 1e-2, seed: int = 0, r: int = 4):
        super().__init__()
        import peft
        import transformers

        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM.from_pretrained(str(base))
        self.model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                target_modules=["q_proj", "v_proj"]))
        self.lr = lr
        self.test_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        self.log("val_loss", loss)

    def test_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        self.test_losses.append(float(loss))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def lora_trainer(root: Path, callbacks: list, max_steps: int = 4, **kwargs) -> pl.Trainer:
    from capture_helpers import quiet

    quiet()
    options = dict(default_root_dir=str(root), accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def lora_run(root: Path, base: Path, task: int, *, steps: int = 4, seed: int = 0, after_fit: bool = True) -> Path:
    """One LoRA fine-tune of ``task`` with CurvatureCapture (and a post-fit per-example Fisher when ``after_fit``)
    and a ModelCheckpoint at the end; returns the run's folder (``final.adapter/``, ``last.ckpt``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge.callbacks import CurvatureCapture

    capture = CurvatureCapture(fisher_after_fit="example" if after_fit else None,
                               fisher_loader=task_loader(task, 4, 1, seed=7), fisher_examples=4)
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    module = LoraLM(base, seed=seed)
    lora_trainer(root, [capture, ckpt], max_steps=steps).fit(module, task_loader(task))
    return root
