"""The world the documentation's examples run in: every file a doc page names (tiny Llama folders, PEFT adapters,
Lightning checkpoints with their statistics sidecars, runs of a small LightningModule) and the placeholder objects
the examples use (``model``, ``dm``, ``experts``, ``base``...). Built once per test session, copied per page."""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import write_statistics


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class DocModel(pl.LightningModule):
    """The docs' LightningModule: a backbone and a head, classification on 8 features, logging val_loss."""

    def __init__(self, seed: int = 0, lr: float = 1e-2):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)
        self.lr = lr

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = 160, seed: int = 0, batch_size: int = 8, inputs_only: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = TensorDataset(x) if inputs_only else TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size)


class DocData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(160, 0)

    def val_dataloader(self):
        return loader(64, 1)

    def test_dataloader(self):
        return loader(64, 2)


def trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(default_root_dir=str(root), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, max_epochs=2, num_sanity_val_steps=0)
    options.update(kwargs)
    options.setdefault("enable_checkpointing", any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
    return pl.Trainer(callbacks=callbacks, **options)


def _gram(d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * d, d, generator=g)
    return x.T @ x


def _stats(shapes: dict, g: torch.Generator) -> dict:
    return {"fisher.batch": {k: torch.rand(s, generator=g) + 0.05 for k, s in shapes.items()},
            "exp_avg_sq": {k: torch.rand(s, generator=g) * 1e-3 + 1e-5 for k, s in shapes.items()},
            "gram": {k: _gram(s[-1], g) for k, s in shapes.items() if len(s) == 2}}  # RegMean's input Gram matrices


_KINDS = {"fisher.batch": {"count": 10, "batch_size": 8}, "exp_avg_sq": {"beta2": 0.999, "step": 100},
          "gram": {"count": 64}}


def _llama_family(root: Path) -> None:
    import peft
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "llama-base")
    base = {k: v for k, v in transformers.LlamaForCausalLM.from_pretrained(root / "base").state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for name in ("code", "math", "expert_code", "expert_math"):
        folder = root / name
        shutil.copytree(root / "base", folder)
        (folder / "model.safetensors").unlink()
        tensors = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_tensors(folder / "model.safetensors", tensors)
        write_statistics(folder / "statistics.safetensors", _stats({k: v.shape for k, v in base.items()}, g), _KINDS)
    (root / "runs" / "task1").mkdir(parents=True)
    (root / "runs" / "task2").mkdir(parents=True)
    shutil.copy(root / "code" / "model.safetensors", root / "runs" / "task1" / "final.safetensors")
    shutil.copy(root / "math" / "model.safetensors", root / "runs" / "task2" / "final.safetensors")
    for i, name in enumerate(("code", "math", "chat")):
        torch.manual_seed(10 + i)
        with contextlib.chdir(root):  # the adapter names its base relatively ("llama-base"): the world can move
            base_model = transformers.LlamaForCausalLM.from_pretrained("llama-base")
        model = peft.get_peft_model(base_model,
                                    peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj", "down_proj"][: 2 + i % 2]))
        model.save_pretrained(root / "adapters" / name)
        state = peft.get_peft_model_state_dict(model)
        write_statistics(root / "adapters" / name / "statistics.safetensors",
                         _stats({k: v.shape for k, v in state.items()}, g), _KINDS)


def _vocabularies(root: Path) -> None:
    """``vocab/base``, ``vocab/chat`` (the base's tokenizer plus two chat tokens) and ``vocab/domain`` (a tokenizer
    of its own): Llamas whose tokenizers differ (cli.md's tokenizer merging)."""
    from tokenizer_family import write_tokenizer_family

    _, experts = write_tokenizer_family(root / "vocab")
    experts[0].rename(root / "vocab" / "chat")
    experts[1].rename(root / "vocab" / "domain")


def _encoder_decoder(root: Path) -> None:
    """``t5/base``, ``t5/summarize`` and ``t5/translate``: a tiny gated T5 and two fine-tunes (cli.md's modules)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(root / "t5" / "base")
    tensors = load_file(root / "t5" / "base" / "model.safetensors")
    for i, name in enumerate(("summarize", "translate")):
        g = torch.Generator().manual_seed(i + 1)
        shutil.copytree(root / "t5" / "base", root / "t5" / name)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
                  root / "t5" / name / "model.safetensors", metadata={"format": "pt"})


def _checkpoints(root: Path) -> None:
    """Lightning checkpoints written by hand: a network held as ``self.model`` (README, experts.md) and plain ones
    (strategies.md, tall.md)."""
    g = torch.Generator().manual_seed(2)
    shapes = {"layers.0.weight": (128, 64), "layers.0.bias": (128,), "layers.1.weight": (10, 128)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

    def save(path: Path, tensors: dict, prefix: str = "", step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {prefix + k: v for k, v in tensors.items()}, "epoch": 0, "global_step": step,
                    "pytorch-lightning_version": pl.__version__}, path)

    save(root / "runs" / "base.ckpt", base, "model.")
    for name in ("runs/code/last.ckpt", "runs/math/last.ckpt", "runs/code/epoch=2-step=300.ckpt"):
        save(root / name, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, "model.")
    save(root / "base.ckpt", base)
    for name in ("math.ckpt", "code.ckpt", "expert_a.ckpt", "expert_b.ckpt", "expert_c.ckpt"):
        save(root / name, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})


def _runs(root: Path) -> None:
    """Real runs of the docs' LightningModule: final weights with statistics, checkpoints with sidecars."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge.callbacks import CurvatureCapture

    save_tensors(root / "base.safetensors", DocModel(seed=0).state_dict())
    for i, task in enumerate(("parity", "mod3")):
        trainer(root / "runs" / task, [CurvatureCapture(dirpath=str(root / "runs" / task))]).fit(
            DocModel(seed=0), loader(160, 10 + i))
    trainer(root, [CurvatureCapture(), ModelCheckpoint(dirpath=str(root / "checkpoints"))], max_epochs=3).fit(
        DocModel(seed=0), loader(160, 3))
    ckpt = ModelCheckpoint(dirpath=str(root / "runs" / "ckpt"), monitor="val_loss", save_top_k=4, save_last=True)
    trainer(root / "runs", [CurvatureCapture(save_final=False), ckpt], max_epochs=5).fit(
        DocModel(seed=0), loader(160, 4), loader(64, 5))


RECIPE = """# a mergekit recipe over the doc world's folders
merge_method: ties
base_model: base/
parameters: {density: 0.2}
models:
  - model: expert_code/
    parameters: {weight: 1.0}
  - model: expert_math/
    parameters: {weight: 0.7}
"""


def build(root: Path) -> Path:
    """Write the doc world into ``root``."""
    quiet()
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(RECIPE)
    _llama_family(root)
    _vocabularies(root)
    _encoder_decoder(root)
    _checkpoints(root)
    _runs(root)
    return root


class LlamaModule(pl.LightningModule):
    """A LightningModule holding the docs' tiny Llama as ``self.model`` (continual.md's ``module``)."""

    def __init__(self, root: Path):
        super().__init__()
        import transformers

        self.model = transformers.LlamaForCausalLM.from_pretrained(root / "base")


class CausalLM(pl.LightningModule):
    """lora.md's LightningModule: Hugging Face's token-mean causal-LM loss."""

    def __init__(self, model: nn.Module, lr: float = 1e-3):
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def lm_loader(n: int = 32, length: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=8)


def namespace(root: Path) -> dict:
    """The placeholder objects the examples use (each page gets fresh ones)."""
    loaders = {"parity": loader(64, 10), "mod3": loader(64, 11)}
    return {
        "model": DocModel(seed=0),
        "module": LlamaModule(root),
        "dm": DocData(),
        "train_loader": loader(160, 0),
        "val_loader": loader(64, 1),
        "test_loader": loader(64, 2),
        "experts": ["code/", "math/"],
        "base": "base/",
        "expert_models": {"parity": DocModel(seed=1), "mod3": DocModel(seed=2)},
        "loaders": loaders,
        "merged_models": DocModel(seed=3),
        "my_validation_score": lambda state: -float(sum(v.float().square().mean() for v in state.values())),
        "merged": DocModel(seed=3),
        "merged_again": DocModel(seed=3),
        "parity_expert": DocModel(seed=1),
        "rotated_expert": DocModel(seed=2),
        "parity_calib": loader(64, 12, inputs_only=True),
        "rotated_calib": loader(64, 13, inputs_only=True),
        "parity_test_loader": loader(64, 14),
        "trainer": trainer(root / "eval", []),
        "CausalLM": CausalLM,
        "lm_train_loader": lm_loader(),
    }
