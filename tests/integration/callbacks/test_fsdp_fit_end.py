"""The fit-end callbacks on a sharded module: ``MergeOnFitEnd``, ``CheckpointAveraging`` and ``ContinualMerge`` under
FSDP2 (``fully_shard`` in ``configure_model``, Lightning's ``ModelParallelStrategy``, two CPU processes on gloo).

Each gives the output one process gives on the same global batches (float32, to float noise), writes it once, and
loads it back into the sharded parameters (each rank its shard): the module each rank ends with, gathered, is the
output file. The trained model reaches rank 0's merge as a file gathered tensor by tensor, and that file is removed
afterwards. A merge that fails on rank 0 (a file lightning-merge did not write is in the way) fails every rank, and
the file is left as it was."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HELPERS, run_sharded_script

from lightning_merge import ContinualState, Expert

pytestmark = pytest.mark.slow

MODULE = textwrap.dedent(
    """
    import torch
    from capture_helpers import Tiny


    class ShardedTiny(Tiny):
        '''Tiny, fully sharded (FSDP2) over the data-parallel mesh when there is one; logs its step as a score.'''

        def configure_model(self):
            if self.device_mesh is None:  # one process: the reference
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            self.log("score", float(self.global_step))
            return super().training_step(batch, batch_idx)


    def fits(root, trainer_for, loader):
        '''The three fits (the same in one process and under FSDP2); returns each fit's module.'''
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_merge.callbacks import CheckpointAveraging, ContinualMerge, CurvatureCapture, MergeOnFitEnd
        from lightning_merge.strategies import Fisher, TaskArithmetic

        experts = [str(root.parent / f"expert{i}" / "final.safetensors") for i in (1, 2)]
        modules = {}
        merge = MergeOnFitEnd(experts=experts, strategy=Fisher(), out=str(root / "merged.safetensors"),
                              include=["net.0.*"], dirpath=str(root / "m"))
        module = ShardedTiny(lr=1e-2)
        trainer_for(root / "m", [CurvatureCapture(save_final=False), merge]).fit(module, loader())
        modules["merge"] = module

        averaging = CheckpointAveraging(select="last", k=2, out=str(root / "averaged.ckpt"))
        checkpoints = ModelCheckpoint(dirpath=str(root / "a" / "ck"), every_n_train_steps=1, save_top_k=-1)
        module = ShardedTiny(lr=1e-2)
        trainer_for(root / "a", [averaging, checkpoints]).fit(module, loader())
        modules["average"] = module

        continual = ContinualMerge(state=str(root / "state"), base=str(root.parent / "base.safetensors"),
                                   strategy=TaskArithmetic(scale=0.5), name="run", load_merged=True)
        module = ShardedTiny(lr=1e-2)
        trainer_for(root / "c", [continual]).fit(module, loader())
        modules["continual"] = module
        return modules
    """
)

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from capture_helpers import ddp_loader, quiet
    from sharded_fit_end import fits
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from safetensors.torch import save_file

    quiet()
    root = Path(sys.argv[1])


    def trainer_for(folder, callbacks):
        return Trainer(default_root_dir=str(folder), max_steps=3, accelerator="cpu", devices=2,
                       strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                       callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, logger=False,
                       use_distributed_sampler=False)


    modules = fits(root, trainer_for, lambda: ddp_loader(32, 4))
    rank = torch.distributed.get_rank()
    for name, module in modules.items():  # what each rank's shards hold, gathered (every rank takes part)
        whole = {k: v.full_tensor().contiguous() for k, v in module.state_dict().items()}
        if rank == 0:
            save_file(whole, str(root / f"module-{name}.safetensors"))

    # rank 0 cannot write the merge (someone else's file is in the way): every rank raises, the file stays
    from lightning_merge.callbacks import MergeOnFitEnd
    from lightning_merge.strategies import TaskArithmetic
    from sharded_fit_end import ShardedTiny

    (root / "foreign.safetensors").write_bytes(b"not ours") if rank == 0 else None
    torch.distributed.barrier()
    merge = MergeOnFitEnd(experts=[str(root.parent / "expert1" / "final.safetensors")], strategy=TaskArithmetic(),
                          out=str(root / "foreign.safetensors"), dirpath=str(root / "f"))
    try:
        trainer_for(root / "f", [merge]).fit(ShardedTiny(lr=1e-2), ddp_loader(32, 4))
    except Exception as err:
        (root / f"raised-{rank}.txt").write_text(f"{type(err).__name__}: {err}")

    from capture_helpers import close_process_group

    close_process_group()
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The experts and base (one process), the reference fits (one process, batches of 8) and the FSDP2 fits (two
    processes, batches of 4 each: the same global batches)."""
    from capture_helpers import loader, trainer

    from lightning_merge.callbacks import CurvatureCapture
    from lightning_merge.files.safetensors import save_tensors

    tmp = tmp_path_factory.mktemp("fit_end")
    (tmp / "sharded_fit_end.py").write_text(MODULE)
    sys.path.insert(0, str(tmp))
    try:
        from sharded_fit_end import ShardedTiny, fits

        save_tensors(tmp / "base.safetensors", ShardedTiny(lr=1e-2).state_dict())
        for i in (1, 2):  # the other experts: fits of their own on other data, with their statistics
            fit = trainer(tmp / f"expert{i}", [CurvatureCapture(async_write=False)], max_steps=3, max_epochs=None)
            fit.fit(ShardedTiny(lr=1e-2, seed=i), loader(32, 8, seed=i))
            written = next((tmp / f"expert{i}").rglob("final.safetensors")).parent
            for name in ("final.safetensors", "final.statistics.safetensors"):  # where fits() looks for them
                (written / name).replace(tmp / f"expert{i}" / name)
        one = tmp / "one"

        def trainer_for(folder, callbacks):
            return trainer(folder, callbacks, max_steps=3, max_epochs=None)

        fits(one, trainer_for, lambda: loader(32, 8))
    finally:
        sys.path.remove(str(tmp))
    sharded = tmp / "fsdp"
    script = tmp / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(tmp), os.environ.get("PYTHONPATH", "")])}
    done = run_sharded_script([sys.executable, str(script), str(sharded)], sharded, timeout=280, env=env,
                              cwd=HELPERS)
    assert done.returncode == 0, done.stderr[-4000:]
    return one, sharded


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    expert = Expert(path)
    return {n: expert.tensor(n) for n in expert.names()}


def _close(got: dict, ref: dict, what: str) -> None:
    assert sorted(got) == sorted(ref), what
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


def test_merge_on_fit_end_under_fsdp2_equals_one_process_and_loads_into_the_shards(runs):
    one, fsdp = runs
    merged = _tensors(fsdp / "merged.safetensors")
    _close(merged, _tensors(one / "merged.safetensors"), "the Fisher merge")
    _close(_tensors(fsdp / "module-merge.safetensors"), merged, "the sharded module after the fit")
    trained = _tensors(fsdp / "module-average.safetensors")  # another module: the merge really changed the weights
    assert not torch.allclose(merged["net.0.weight"], trained["net.0.weight"])
    assert sorted(p.name for p in (fsdp / "m").iterdir() if p.is_file()) == ["merge_base_snapshot.safetensors"]


def test_checkpoint_averaging_of_distributed_checkpoints_equals_one_process(runs):
    one, fsdp = runs
    assert (fsdp / "a" / "ck" / "epoch=0-step=3.ckpt").is_dir()  # distributed checkpoints, averaged lazily
    averaged = _tensors(fsdp / "averaged.ckpt")
    _close(averaged, _tensors(one / "averaged.ckpt"), "the average of the last two checkpoints")
    _close(_tensors(fsdp / "module-average.safetensors"), averaged, "the sharded module after the fit")


def test_continual_merge_under_fsdp2_equals_one_process(runs):
    one, fsdp = runs
    state = ContinualState(fsdp / "state")
    assert state.count == 1 and state.journal[0]["name"] == "run"
    folded = state.state_dict()
    _close(folded, ContinualState(one / "state").state_dict(), "the continual state")
    _close(_tensors(fsdp / "module-continual.safetensors"), folded, "the sharded module after the fit")
    assert not (fsdp / "c" / "continual_trained.safetensors").exists()


def test_a_merge_that_fails_on_rank_zero_fails_every_rank_and_keeps_the_file(runs):
    _, fsdp = runs
    assert (fsdp / "foreign.safetensors").read_bytes() == b"not ours"
    assert "foreign.safetensors" in (fsdp / "raised-0.txt").read_text()
    assert "failed on rank 0" in (fsdp / "raised-1.txt").read_text()
