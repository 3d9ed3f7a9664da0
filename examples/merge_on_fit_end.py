"""Merge at fit end: two digits experts trained earlier, a third merged with them when its fit ends.

    python examples/merge_on_fit_end.py [OUT_DIR]

Each run fine-tunes the same pre-trained backbone on its own task with `CurvatureCapture`; the third run also has
`MergeOnFitEnd`, which merges the three backbones with Fisher merging (heads stay each run's own) and loads the
result into the module. The table compares each expert with the merged backbone on every task.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import Expert, Fisher
from lightning_merge.callbacks import CurvatureCapture, MergeOnFitEnd
from lightning_merge.cli.demo import TASKS, load_digits_splits, make_backbone, quiet_lightning, task_data
from lightning_merge.tools.evaluation import MergeReport, evaluate


class TaskModel(pl.LightningModule):
    def __init__(self, num_classes: int, base: dict):
        super().__init__()
        self.backbone = make_backbone()
        self.backbone.load_state_dict(base)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(model, task, splits, root, callbacks):
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(TensorDataset(*task_data(task, splits["train"])), batch_size=32, shuffle=True)
    pl.Trainer(
        max_epochs=12,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    ).fit(model, loader)


def main(out: Path) -> None:
    quiet_lightning()
    torch.manual_seed(0)
    splits = load_digits_splits()
    # a base backbone, pre-trained briefly on 10-way digits
    base = make_backbone()
    pre = nn.Sequential(base, nn.Linear(128, 10))
    opt = torch.optim.Adam(pre.parameters(), lr=3e-3)
    x, y = splits["pretrain"]
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(pre(x), y).backward()
        opt.step()
    base_state = {f"backbone.{k}": v.detach().clone() for k, v in base.state_dict().items()}
    save_file(base_state, str(out / "base.safetensors"))

    tasks = TASKS[:3]
    models, paths = [], []
    for task in tasks[:2]:  # two earlier runs
        model = TaskModel(task.num_classes, base.state_dict())
        fit(model, task, splits, out / task.name, [CurvatureCapture()])
        models.append(model)
        paths.append(str(out / task.name / "final.safetensors"))

    last = tasks[2]
    model = TaskModel(last.num_classes, base.state_dict())
    merger = MergeOnFitEnd(
        experts=paths,
        strategy=Fisher(scale=1.3),
        base=str(out / "base.safetensors"),
        include=["backbone.*"],
        out=str(out / "merged.safetensors"),
    )
    fit(model, last, splits, out / last.name, [CurvatureCapture(), merger])
    trained = Expert(out / last.name / "final.safetensors")  # the third expert before the merge

    loaders = {t.name: [task_data(t, splits["test"])] for t in tasks}
    heads = [m.head for m in models] + [model.head]
    expert_backbones = [m.backbone for m in models]
    third = make_backbone()
    third.load_state_dict(
        {k[len("backbone.") :]: trained.tensor(k) for k in trained.names() if k.startswith("backbone.")}
    )
    expert_backbones.append(third)
    own = {
        t.name: evaluate(nn.Sequential(expert_backbones[i], heads[i]), {t.name: loaders[t.name]})[t.name]
        for i, t in enumerate(tasks)
    }
    report = MergeReport(own)
    report.add(
        "merged at fit end (Fisher)",
        evaluate({t.name: nn.Sequential(model.backbone, heads[i]) for i, t in enumerate(tasks)}, loaders),
        1.3,
    )
    print(report)
    print(f"\nmerged model: {merger.merged_path}")


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="merge-on-fit-end-"))
    folder.mkdir(parents=True, exist_ok=True)
    main(folder)
