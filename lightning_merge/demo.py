"""The demo: train small experts with Lightning on scikit-learn's digits, merge their backbones with every
strategy, and print a table of per-task and normalized accuracy. Nothing is downloaded.

A backbone is pre-trained briefly on 10-way digit classification; each expert fine-tunes it (with a head of its
own) on a different task: a different label function and a different input transform. Merged backbones are
evaluated with each expert's own head, and the scale λ of each task-vector method is chosen on validation data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Task:
    """A digits task: a label function over the digit, an input transform over the 8×8 image."""

    name: str
    num_classes: int
    label: Callable[[Tensor], Tensor]
    transform: Callable[[Tensor], Tensor]


def _flip(x: Tensor) -> Tensor:
    return x.view(-1, 8, 8).flip(-1).reshape(-1, 64)


def _rot90(x: Tensor) -> Tensor:
    return torch.rot90(x.view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64)


def _invert(x: Tensor) -> Tensor:
    return 1.0 - x


def _identity(x: Tensor) -> Tensor:
    return x


def _parity(y: Tensor) -> Tensor:
    return y % 2


def _large(y: Tensor) -> Tensor:
    return (y >= 5).long()


def _mod3(y: Tensor) -> Tensor:
    return y % 3


def _same(y: Tensor) -> Tensor:
    return y


TASKS = (
    Task("parity", 2, _parity, _identity),
    Task("large-flipped", 2, _large, _flip),
    Task("mod3-inverted", 3, _mod3, _invert),
    Task("digit-rotated", 10, _same, _rot90),
)


def load_digits_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits (1,797 8×8 images, bundled), shuffled and split: pretrain / train / val / test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the demo needs scikit-learn: pip install 'lightning-merge[demo]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cuts = {"pretrain": (0, 500), "train": (500, 1300), "val": (1300, 1550), "test": (1550, len(y))}
    return {k: (x[a:b], y[a:b]) for k, (a, b) in cuts.items()}


def make_backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())


def task_data(task: Task, split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    x, y = split
    return task.transform(x), task.label(y)


def _module_class():
    import lightning as L

    class DigitsClassifier(L.LightningModule):
        """A backbone and a head; Adam, so the optimizer holds second moments."""

        def __init__(self, backbone: nn.Module, num_classes: int, lr: float = 1e-3):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(128, num_classes)
            self.lr = lr

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    return DigitsClassifier


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter for scripts that train many tiny models."""
    import lightning  # noqa: F401  (importing it sets its loggers to INFO; override after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def train(module, x: Tensor, y: Tensor, epochs: int, seed: int, callbacks=(), default_root_dir=None,
          batch_size: int = 32):
    """Fit ``module`` on (x, y) with a plain Lightning Trainer on the CPU."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        default_root_dir=default_root_dir,
    )
    trainer.fit(module, loader)
    return trainer


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, x: Tensor, y: Tensor) -> float:
    from torchmetrics.functional.classification import multiclass_accuracy

    logits = head(backbone(x))
    return float(multiclass_accuracy(logits, y, num_classes=logits.shape[-1], average="micro"))


def run_demo(out_dir: str | os.PathLike | None = None, seed: int = 0, quick: bool = False) -> dict[str, dict]:
    """Train, merge, evaluate, print the table; return ``{method: {task: accuracy, ..., "normalized": x}}``."""
    from lightning_merge import Breadcrumbs, Dare, Linear, TaskArithmetic, Ties, merge

    quiet_lightning()
    started = time.perf_counter()
    torch.manual_seed(seed)
    splits = load_digits_splits(seed)
    Classifier = _module_class()
    epochs = 3 if quick else 12

    keep = tempfile.TemporaryDirectory() if out_dir is None else None
    root = Path(out_dir or keep.name)
    root.mkdir(parents=True, exist_ok=True)

    base = make_backbone()
    pre = Classifier(base, 10, lr=3e-3)
    train(pre, *splits["pretrain"], epochs=epochs, seed=seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    experts, heads = [], []
    for t, task in enumerate(TASKS):
        backbone = make_backbone()
        backbone.load_state_dict(base_state)
        model = Classifier(backbone, task.num_classes)
        train(model, *task_data(task, splits["train"]), epochs=epochs, seed=seed + 1 + t)
        experts.append({k: v.detach().clone() for k, v in backbone.state_dict().items()})
        heads.append(model.head.eval())
    print(f"trained a base and {len(TASKS)} experts in {time.perf_counter() - started:.1f}s")

    def scores(state: dict[str, Tensor], split: str) -> list[float]:
        backbone = make_backbone()
        backbone.load_state_dict(state)
        return [accuracy(backbone, heads[t], *task_data(task, splits[split])) for t, task in enumerate(TASKS)]

    own = [scores(experts[t], "test")[t] for t in range(len(TASKS))]
    own_val = [scores(experts[t], "val")[t] for t in range(len(TASKS))]
    methods: dict[str, Callable[[float], object] | object] = {
        "average": Linear(),
        "task_arithmetic": lambda s: TaskArithmetic(scale=s),
        "ties": lambda s: Ties(density=0.2, scale=s),
        "dare": lambda s: Dare(drop_rate=0.5, combine="ties", scale=s),
        "breadcrumbs": lambda s: Breadcrumbs(density=0.9, gamma=0.01, scale=s),
    }
    grid = (0.3, 0.5, 0.7, 1.0, 1.3) if not quick else (0.5, 1.0)
    results: dict[str, dict] = {}
    results["experts (own task)"] = {**dict(zip((t.name for t in TASKS), own)), "normalized": 1.0, "scale": None}
    results["base (no merge)"] = _row(scores(base_state, "test"), own, None)
    for name, make in methods.items():
        if callable(make):
            best = max(grid, key=lambda s: _normalized(scores(merge(experts, base_state, make(s)), "val"), own_val))
            strategy = make(best)
        else:
            best, strategy = None, make
        merged = merge(experts, base_state, strategy)
        results[name] = _row(scores(merged, "test"), own, best)
    print_table(results, [t.name for t in TASKS])
    print(f"total {time.perf_counter() - started:.1f}s")
    if keep is not None:
        keep.cleanup()
    return results


def _normalized(acc: list[float], own: list[float]) -> float:
    return sum(a / o for a, o in zip(acc, own)) / len(acc)


def _row(acc: list[float], own: list[float], scale: float | None) -> dict:
    return {**dict(zip((t.name for t in TASKS), acc)), "normalized": _normalized(acc, own), "scale": scale}


def print_table(results: dict[str, dict], tasks: list[str]) -> None:
    """Print accuracy per task, normalized accuracy and the chosen λ, one row per method."""
    width = max(len(k) for k in results) + 2
    header = f"{'method':<{width}}" + "".join(f"{t:>16}" for t in tasks) + f"{'normalized':>12}{'λ':>6}"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        cells = "".join(f"{100 * row[t]:>15.1f}%" for t in tasks)
        scale = "" if row.get("scale") is None else f"{row['scale']:.1f}"
        print(f"{name:<{width}}{cells}{100 * row['normalized']:>11.1f}%{scale:>6}")
