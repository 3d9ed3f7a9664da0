"""A 2-process CPU fit under Lightning's ModelParallelStrategy with FSDP2 (``fully_shard``), writing distributed
checkpoints (tests/test_distcp.py runs it once per session): ``python tests/distcp_fit.py OUT``.

Writes ``OUT/ck/step=2.ckpt``, ``OUT/ck/step=4.ckpt`` and ``OUT/ck/last.ckpt`` (folders of ``__<rank>_0.distcp``,
``.metadata``, ``meta.pt``) and, gathered on rank 0 at the same steps, the full state dict
(``OUT/ref/step=N.safetensors``) and the optimizer's full ``exp_avg_sq`` and step (``OUT/ref/step=N.exp_avg_sq.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard


class ShardedModule(pl.LightningModule):
    """Shapes that do not split evenly over 2 ranks (5 rows: 3 + 2; 1 row: 1 + 0), a float buffer and an integer
    buffer (replicated, saved once)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
        self.register_buffer("scale", torch.full((3,), 0.5))
        self.register_buffer("counts", torch.arange(3))

    def configure_model(self) -> None:
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05, betas=(0.8, 0.95))


class GatherReference(Callback):
    """At steps 2 and 4, every rank joins the gather; rank 0 saves the full weights and second moments."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if trainer.global_step not in (2, 4):
            return
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(pl_module, options=options)
        optimizer = get_optimizer_state_dict(pl_module, trainer.optimizers[0], options=options)
        if trainer.global_rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            step = trainer.global_step
            save_file({k: v.contiguous() for k, v in weights.items()}, str(self.out / f"step={step}.safetensors"))
            moments = {name: {"exp_avg_sq": s["exp_avg_sq"], "step": s["step"]}
                       for name, s in optimizer["state"].items()}
            torch.save(moments, self.out / f"step={step}.exp_avg_sq.pt")


def main(out: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    checkpoints = ModelCheckpoint(dirpath=out / "ck", filename="{step}", every_n_train_steps=2, save_top_k=-1,
                                  save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[GatherReference(out / "ref"), checkpoints],
    )
    trainer.fit(ShardedModule(), torch.utils.data.DataLoader(data, batch_size=4))
    if torch.distributed.is_initialized():  # gloo aborts at exit now and then without it (capture_helpers)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
