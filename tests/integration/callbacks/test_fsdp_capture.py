"""CurvatureCapture under FSDP2 (``fully_shard`` in ``configure_model``, Lightning's ``ModelParallelStrategy``, two
CPU processes on gloo): the statistics and weights equal one process on the same global batches, sidecars sit next
to the distributed checkpoints and rotate with them, and a rank that fails makes every rank fail.

One 2-process fit writes every artefact the comparisons read; the collective helpers of
:mod:`lightning_merge.capture.sharded` are tested on DTensors in two plain gloo processes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HELPERS as HERE  # noqa: E402  (the helper modules a spawned fit imports)
from conftest import run_sharded_script  # noqa: E402

from lightning_merge.capture.sharded import checkpoint_sidecar, sharded_refusal
from lightning_merge.formats.sidecar import encode, find_sidecar

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
    """
)

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from capture_helpers import ddp_loader, quiet
    from sharded_tiny import ShardedTiny
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_merge.callbacks import CurvatureCapture

    quiet()
    root = sys.argv[1]
    rank = os.environ.get("LOCAL_RANK", "0")
    for folder, steps, resume in (("", 3, None), ("/resumed", 5, root + "/ck/epoch=0-step=3.ckpt")):
        trainer = Trainer(default_root_dir=root + folder, max_steps=steps, accelerator="cpu", devices=2,
                          strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                          callbacks=[CurvatureCapture(gram="train"),
                                     ModelCheckpoint(dirpath=root + folder + "/ck", every_n_train_steps=1,
                                                     save_top_k=1, monitor="score", mode="max")],
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          use_distributed_sampler=False)
        trainer.fit(ShardedTiny(lr=1e-2), ddp_loader(32, 4), ckpt_path=resume)
    try:
        trainer.callbacks[0].finalize()
    except NotImplementedError as err:
        Path(root, f"finalize-{rank}.txt").write_text(str(err))
    Path(root, f"done-{rank}.txt").write_text("ok")

    from capture_helpers import close_process_group

    close_process_group()
    """
)


def _reference(tmp_path: Path) -> Path:
    """The same fit in one process, with batches of 8: the same global batches, steps and checkpoints."""
    from capture_helpers import loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from sharded_tiny import ShardedTiny

    from lightning_merge.callbacks import CurvatureCapture

    root = tmp_path / "one"
    for folder, steps, resume in ((root, 3, None), (root / "resumed", 5, root / "ck" / "epoch=0-step=3.ckpt")):
        fit = trainer(folder, [CurvatureCapture(gram="train", async_write=False),
                               ModelCheckpoint(dirpath=folder / "ck", every_n_train_steps=1, save_top_k=1,
                                               monitor="score", mode="max")], max_steps=steps, max_epochs=None)
        fit.fit(ShardedTiny(lr=1e-2), loader(32, 8), ckpt_path=resume)
    return root


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    (tmp_path / "sharded_tiny.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        reference = _reference(tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
    root = tmp_path / "fsdp"
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = run_sharded_script([sys.executable, str(script), str(root)], root, timeout=240, env=env, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "done-0.txt").exists() and (root / "done-1.txt").exists()
    return reference, root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from lightning_merge.files.safetensors import load_tensors

    return load_tensors(path)


@pytest.mark.slow
def test_statistics_and_weights_under_fsdp2_equal_one_process(fits):
    from lightning_merge.formats.sidecar import Statistics

    one, fsdp = fits
    for name in ("final.safetensors", "final.statistics.safetensors"):
        ref, got = _tensors(one / "ck" / name), _tensors(fsdp / "ck" / name)
        assert sorted(got) == sorted(ref)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")
    ref, got = Statistics.load(one / "ck" / "final.statistics.safetensors"), \
        Statistics.load(fsdp / "ck" / "final.statistics.safetensors")
    assert {k.split("/")[0] for k in got.keys()} == {"exp_avg_sq", "fisher.batch", "gram"}
    assert got.metadata["base_fingerprint"] == ref.metadata["base_fingerprint"]  # the sharded base, unsharded
    assert got.kinds["fisher.batch"]["mean_weight"] == ref.kinds["fisher.batch"]["mean_weight"] == 8.0
    assert got.kinds["fisher.batch"]["world_size"] == 2 and got.kinds["fisher.batch"]["steps_recorded"] == 3
    assert got.kinds["exp_avg_sq"]["step"] == ref.kinds["exp_avg_sq"]["step"] == 3
    assert got.kinds["gram"]["count"] == ref.kinds["gram"]["count"] == {"net.0.weight": 24, "net.2.weight": 24}


@pytest.mark.slow
def test_a_fit_resumed_from_a_distributed_checkpoint_continues_the_statistics(fits):
    from lightning_merge.formats.sidecar import Statistics

    one, fsdp = fits
    for name in ("final.safetensors", "final.statistics.safetensors"):
        ref, got = _tensors(one / "resumed" / "ck" / name), _tensors(fsdp / "resumed" / "ck" / name)
        assert sorted(got) == sorted(ref)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")
    got = Statistics.load(fsdp / "resumed" / "ck" / "final.statistics.safetensors")
    assert got.kinds["fisher.batch"]["steps_recorded"] == 5 and got.kinds["fisher.batch"]["restarted_at"] is None
    assert got.kinds["exp_avg_sq"]["step"] == 5
    for rank in (0, 1):  # statistics held as shards are not handed out in memory: a clear error, on every rank
        assert "sharded (FSDP2)" in (fsdp / f"finalize-{rank}.txt").read_text()
    first = Statistics.load(fsdp / "ck" / "final.statistics.safetensors")
    assert got.metadata["base_fingerprint"] == first.metadata["base_fingerprint"]  # the base of the first fit


@pytest.mark.slow
def test_sidecars_sit_next_to_distributed_checkpoints_and_rotate_with_them(fits):
    from lightning_merge.formats.sidecar import Statistics

    one, fsdp = fits
    ck = fsdp / "ck"
    folders = sorted(p.name for p in ck.iterdir() if p.is_dir())
    sidecars = sorted(p.name for p in ck.glob("epoch=*.statistics.safetensors"))
    assert folders == ["epoch=0-step=3.ckpt"]  # save_top_k=1 removed steps 1 and 2 ...
    assert sidecars == ["epoch=0-step=3.statistics.safetensors"]  # ... and their sidecars
    assert (ck / "epoch=0-step=3.ckpt" / "meta.pt").is_file()
    assert find_sidecar(ck / "epoch=0-step=3.ckpt") == ck / "epoch=0-step=3.statistics.safetensors"
    got = _tensors(ck / "epoch=0-step=3.statistics.safetensors")
    ref = _tensors(one / "ck" / "epoch=0-step=3.statistics.safetensors")
    assert sorted(got) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    meta = torch.load(ck / "epoch=0-step=3.ckpt" / "meta.pt", weights_only=True)
    state = next(v for k, v in meta["callbacks"].items() if k.startswith("CurvatureCapture"))
    assert Statistics.load(ck / "epoch=0-step=3.statistics.safetensors").metadata["resume_token"] == state["token"]


def test_sidecar_of_a_checkpoint_folder_is_named_as_for_a_file(tmp_path):
    folder = tmp_path / "epoch=0-step=3.ckpt"
    folder.mkdir()
    assert checkpoint_sidecar(folder) == tmp_path / "epoch=0-step=3.statistics.safetensors"
    assert find_sidecar(folder) is None
    from lightning_merge.formats.sidecar import write_statistics

    write_statistics(checkpoint_sidecar(folder), {"exp_avg_sq": {"w": torch.ones(2)}}, {"exp_avg_sq": {}})
    assert find_sidecar(folder) == checkpoint_sidecar(folder)
    plain = tmp_path / "model"  # a folder not named like a file keeps its sidecar inside
    plain.mkdir()
    (tmp_path / "model.statistics.safetensors").write_bytes(b"not ours")
    assert find_sidecar(plain) is None


def test_what_cannot_run_sharded_is_refused_before_training():
    assert sharded_refusal("fsdp2", fisher=True) is None  # post-fit passes and PEFT too: test_fsdp_post_fit.py
    assert sharded_refusal("dtensor", fisher=True) is None
    assert sharded_refusal(None, fisher=True) is None
    assert "FSDP2" in sharded_refusal("fsdp1", fisher=True)
    assert sharded_refusal("fsdp1", fisher=False) is None


@pytest.mark.parametrize("compression", ["float32", "bfloat16", "rank1"])
@pytest.mark.parametrize("shape", [(5, 4), (3,), (2, 3, 2)])
def test_planned_specs_are_those_encode_stores(compression, shape):
    from lightning_merge.capture.sharded import _stored_specs

    value = torch.rand(shape)
    planned = _stored_specs("k", value, compression)
    stored = encode("k", value, compression)
    assert [(k, s.shape, s.dtype) for k, s in planned] == [(k, tuple(t.shape), t.dtype) for k, t in stored.items()]


def _worker(rank: int, port: int, root: str) -> None:
    """Two gloo processes: DTensor shards of known tensors through the collective helpers."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_merge.capture import sharded
    from lightning_merge.formats.sidecar import tensor_fingerprint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = Path(root)
    try:
        mesh = init_device_mesh("cpu", (2,))
        whole = {"a": torch.arange(15.0).reshape(5, 3), "b": torch.linspace(0, 1, 7)}  # uneven shards
        dts = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in whole.items()}
        assert sharded.fingerprints(dts.items()) == {n: tensor_fingerprint(t) for n, t in whole.items()}
        for n, t in whole.items():
            assert torch.equal(sharded.shard_like(t, dts[n]), dts[n].to_local())
            assert torch.equal(sharded.full(sharded.like(dts[n].to_local() * 2, dts[n])), t * 2)
        assert sharded.all_ranks(True) and not sharded.all_ranks(rank == 0)
        stats = {"fisher.batch": dict(dts), "gram": {"a": torch.eye(3)}}
        kinds = {"fisher.batch": {"estimator": "batch", "count": 1, "scale": 1.0}, "gram": {"count": {"a": 4}}}
        sharded.write_statistics_gathered(out / "s.statistics.safetensors" if rank == 0 else None, stats, kinds,
                                          compression="bfloat16", resume={"fisher.batch": dict(dts)},
                                          share=_broadcast)
        # rank 0 cannot write (a file lightning-merge did not write is in the way): every rank raises
        (out / "foreign.safetensors").write_bytes(b"someone else's") if rank == 0 else None
        try:
            sharded.write_gathered(out / "foreign.safetensors" if rank == 0 else None,
                                   sharded.weights_items(dts), {"format": "pt"}, share=_broadcast)
        except Exception as err:  # noqa: BLE001 - recorded for the test
            (out / f"raised-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _broadcast(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@pytest.mark.slow
def test_gathered_sidecar_equals_the_unsharded_one_and_a_failing_writer_fails_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from lightning_merge.formats.sidecar import Statistics, write_statistics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    whole = {"a": torch.arange(15.0).reshape(5, 3), "b": torch.linspace(0, 1, 7)}
    write_statistics(tmp_path / "ref.statistics.safetensors", {"fisher.batch": whole, "gram": {"a": torch.eye(3)}},
                     {"fisher.batch": {"estimator": "batch", "count": 1, "scale": 1.0}, "gram": {"count": {"a": 4}}},
                     compression="bfloat16", resume={"fisher.batch": whole})
    got, ref = _tensors(tmp_path / "s.statistics.safetensors"), _tensors(tmp_path / "ref.statistics.safetensors")
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    gathered = Statistics.load(tmp_path / "s.statistics.safetensors")
    assert gathered.kinds == Statistics.load(tmp_path / "ref.statistics.safetensors").kinds
    assert (tmp_path / "foreign.safetensors").read_bytes() == b"someone else's"  # never replaced
    assert "foreign.safetensors" in (tmp_path / "raised-0.txt").read_text()
    assert "failed on rank 0" in (tmp_path / "raised-1.txt").read_text()
    assert "foreign.safetensors" in (tmp_path / "raised-1.txt").read_text()
