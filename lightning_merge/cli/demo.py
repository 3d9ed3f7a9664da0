"""The demo: train small experts with Lightning on scikit-learn's digits, merge their backbones with every
strategy, and print a table of per-task and normalized accuracy. Nothing is downloaded.

A backbone is pre-trained briefly on 10-way digit classification; each expert fine-tunes it (with a head of its
own) on a different task: a different label function and a different input transform. Merged backbones are
evaluated with each expert's own head, and the scale λ of each task-vector method is chosen on validation data.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
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
          batch_size: int = 32, max_steps: int = -1):
    """Fit ``module`` on (x, y) with a plain Lightning Trainer on the CPU (``max_steps`` > 0: that many optimizer
    steps, as many epochs as they take, instead of ``epochs``)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs if max_steps <= 0 else -1, max_steps=max_steps, accelerator="cpu", devices=1,
        logger=False, enable_checkpointing=False,
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


@dataclass
class DigitsExperts:
    """A base backbone, one expert per task (with its own head and captured statistics), and scoring helpers.

    Attributes:
        splits: the digits splits.
        base: the pre-trained backbone's state dict (names ``0.weight``...).
        experts: one :class:`~lightning_merge.Expert` per task: the fine-tuned backbone with the statistics
            ``CurvatureCapture`` recorded (Adam second moments, batch and per-example Fisher, input Gram matrices).
        heads: each task's own head.
        tasks: the tasks.
    """

    splits: dict[str, tuple[Tensor, Tensor]]
    base: dict[str, Tensor]
    experts: list
    heads: list[nn.Module]
    tasks: tuple[Task, ...] = TASKS

    def scores(self, state: dict[str, Tensor], split: str) -> dict[str, float]:
        """Accuracy of backbone ``state`` with each task's head on that task's ``split``."""
        backbone = make_backbone()
        backbone.load_state_dict(state)
        return {task.name: accuracy(backbone, self.heads[t], *task_data(task, self.splits[split]))
                for t, task in enumerate(self.tasks)}

    def own_scores(self, split: str) -> dict[str, float]:
        """Each expert's accuracy on its own task."""
        return {task.name: self.scores(self.expert_state(t), split)[task.name] for t, task in enumerate(self.tasks)}

    def expert_state(self, t: int) -> dict[str, Tensor]:
        expert = self.experts[t]
        return {name: expert.tensor(name) for name in expert.names()}


def train_digits_experts(seed: int = 0, epochs: int = 12, capture: bool = True, lr: float = 1e-3,
                         tasks: tuple[Task, ...] = TASKS, verbose: bool = True, steps: Sequence[int] | None = None,
                         **capture_args) -> DigitsExperts:
    """Pre-train a backbone briefly on 10-way digits, then fine-tune one expert per task with ``CurvatureCapture``.

    Args:
        seed: seeds the split, the base and the experts.
        epochs: epochs of pre-training and of each fine-tune.
        capture: record statistics (second moments, batch Fisher; per-example Fisher and the linear layers' input
            Gram matrices on 512 training examples).
        lr: the experts' learning rate.
        tasks: the tasks.
        verbose: print the training time.
        steps: optimizer steps of each fine-tune (expert t: ``steps[t % len(steps)]``) instead of ``epochs``
            (experts trained for unequal lengths); the pre-training still runs ``epochs``.
        capture_args: overrides of the ``CurvatureCapture`` arguments.
    """
    from lightning_merge.sources.expert import Expert

    quiet_lightning()
    started = time.perf_counter()
    torch.manual_seed(seed)
    splits = load_digits_splits(seed)
    Classifier = _module_class()
    base = make_backbone()
    pre = Classifier(base, 10, lr=3e-3)
    if verbose:
        print(f"pre-training a base on 10-way digits ({epochs} epochs)...", flush=True)
    train(pre, *splits["pretrain"], epochs=epochs, seed=seed)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}

    experts, heads = [], []
    for t, task in enumerate(tasks):
        backbone = make_backbone()
        backbone.load_state_dict(base_state)
        model = Classifier(backbone, task.num_classes, lr=lr)
        callbacks = []
        if capture:
            from lightning_merge.callbacks import CurvatureCapture

            options = dict(fisher_after_fit="example", fisher_loader="train", fisher_examples=512, gram="after_fit",
                           checkpoint_sidecars=False, save_final=False)
            options.update(capture_args)
            callbacks.append(CurvatureCapture(**options))
        if verbose:
            print(f"fine-tuning expert {t + 1}/{len(tasks)} ({task.name}) with CurvatureCapture...", flush=True)
        train(model, *task_data(task, splits["train"]), epochs=epochs, seed=seed + 1 + t, callbacks=callbacks,
              max_steps=steps[t % len(steps)] if steps else -1)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
        stats = callbacks[0].finalize() if capture else None
        experts.append(Expert(state, prefix="backbone.", statistics=stats, name=task.name))
        heads.append(model.head.eval())
    if verbose:
        print(f"trained a base and {len(tasks)} experts in {time.perf_counter() - started:.1f}s")
    return DigitsExperts(splits, base_state, experts, heads, tasks)


def demo_strategies(quick: bool = False) -> dict[str, object]:
    """The strategies the demo compares (those with a ``scale`` get λ tuned on validation data)."""
    from lightning_merge.strategies import (
        OTA,
        Breadcrumbs,
        Cabs,
        Consensus,
        Dare,
        Fisher,
        Linear,
        RegMean,
        TaskArithmetic,
        Ties,
        WeightedMedian,
    )

    return {
        "average": Linear(),
        "task_arithmetic": TaskArithmetic(),
        "ties": Ties(density=0.2),
        "dare": Dare(drop_rate=0.5, combine="ties"),
        "breadcrumbs": Breadcrumbs(density=0.9, gamma=0.01),
        "cabs": Cabs(n=64, m=256),
        "consensus": Consensus(),
        "fisher": Fisher(),
        "ota": OTA(),
        "ota_ffg": OTA(density=0.3),
        "weighted_median": WeightedMedian(),
        "regmean": RegMean(),
    }


def run_demo(out_dir: str | os.PathLike | None = None, seed: int = 0, quick: bool = False) -> dict[str, dict]:
    """Train with capture, merge with every strategy, evaluate, print the table.

    Returns:
        ``{method: {task: accuracy, ..., "normalized": x, "scale": λ}}``.
    """
    from lightning_merge.engine.run import merge
    from lightning_merge.tools.evaluation import MergeReport, normalized_score, sweep_scale

    started = time.perf_counter()
    setup = train_digits_experts(seed=seed, epochs=3 if quick else 12)
    if out_dir is not None:
        _save_experts(setup, Path(out_dir))
    own_val = setup.own_scores("val")
    report = MergeReport(setup.own_scores("test"))
    report.add("base (no merge)", setup.scores(setup.base, "test"))
    grid = (0.5, 1.0, 1.5) if quick else (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)

    def val_score(state: dict[str, Tensor]) -> float:
        return normalized_score(setup.scores(state, "val"), own_val)

    strategies = demo_strategies(quick)
    for i, (name, strategy) in enumerate(strategies.items()):
        print(f"merging {i + 1}/{len(strategies)}: {name}" + (" (λ on validation)" if hasattr(strategy, "scale")
                                                               else ""), flush=True)
        if hasattr(strategy, "scale"):
            result = sweep_scale(strategy, setup.experts, setup.base, val_score, grid)
            report.add(name, setup.scores(result.state, "test"), result.scale)
        else:
            report.add(name, setup.scores(merge(setup.experts, setup.base, strategy), "test"))
    print(report.table())
    print(f"normalized accuracy: merged ÷ expert per task, averaged; λ chosen on validation data. "
          f"total {time.perf_counter() - started:.1f}s")
    return report.as_dict()


def _save_experts(setup: DigitsExperts, out: Path) -> None:
    """Write the base and each expert (with its statistics) as safetensors files under ``out``."""
    from lightning_merge.files.ownership import marked
    from lightning_merge.files.safetensors import save_tensors
    from lightning_merge.formats.sidecar import write_statistics

    mark = marked({"format": "pt"}, {"output": "demo"})  # a re-run replaces these, and never a user's file
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "base.safetensors", setup.base, mark, replace="own")
    for t, expert in enumerate(setup.experts):
        path = out / f"{setup.tasks[t].name}.safetensors"
        save_tensors(path, setup.expert_state(t), mark, replace="own")
        stats = expert.statistics
        if stats is not None:
            per_kind: dict[str, dict[str, Tensor]] = {}
            for key in stats.keys():
                kind, name = key.split("/", 1)
                if name.startswith("backbone."):  # the head is the expert's own, not merged
                    per_kind.setdefault(kind, {})[name[len("backbone."):]] = stats._tensors[key]
            write_statistics(out / f"{setup.tasks[t].name}.statistics.safetensors", per_kind, stats.kinds)
