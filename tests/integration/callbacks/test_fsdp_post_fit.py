"""CurvatureCapture's post-fit passes and PEFT adapters under FSDP2 (``fully_shard`` in ``configure_model``,
Lightning's ``ModelParallelStrategy``, two CPU processes on gloo), each equal to one process.

- The post-fit Fisher (``"example"``, ``"true"``, ``"exact"``) and the post-fit Gram matrices of a sharded classifier:
  in the final sidecar, equal to a one-process fit on the same global batches; the three estimators, computed on the
  trained sharded model, equal :func:`compute_fisher` on the same examples in one process (the true Fisher's labels
  drawn as DDP draws them: rank r's batches from ``seed + r``), also with ranks holding unequal shares.
- A PEFT LoRA Llama, each decoder layer and the whole model sharded: ``X.adapter/`` beside the distributed checkpoint
  (rotated with it) and ``final.adapter/`` equal the folders one process writes, weights and statistics, including a
  post-fit Fisher over padded sequences (labels -100, causal shift)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HELPERS, run_sharded_script

pytestmark = pytest.mark.slow

MODULES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader
    from capture_helpers import Tiny, TinyLM, lm_examples, pad_lm


    class ShardedTiny(Tiny):
        '''Tiny, fully sharded (FSDP2) over the data-parallel mesh when there is one.'''

        def configure_model(self):
            if self.device_mesh is None:  # one process: the reference
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)


    def llama_config():
        import transformers

        return transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


    class ShardedLoRA(TinyLM):
        '''A tiny Llama (hidden 32, 2 layers) with LoRA r=4 on q_proj and v_proj; under FSDP2 each decoder layer and
        the whole model are sharded.'''

        def __init__(self, lr):
            super().__init__(lr=lr)
            import peft
            import transformers

            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(llama_config())
            self.model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                    target_modules=["q_proj", "v_proj"]))

        def configure_model(self):
            if self.device_mesh is None:
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            self.log("score", float(self.global_step))
            return super().training_step(batch, batch_idx)


    def fixed_length_lm(n, batch_size, sampler=None):
        '''Sequences of one length: a token-mean loss per rank, averaged over ranks, is the global batch's.'''
        return DataLoader(lm_examples(n, seed=2, min_len=8, max_len=8), batch_size=batch_size, sampler=sampler,
                          collate_fn=pad_lm)


    def padded_lm():
        '''Sequences of lengths 4 to 12 in batches of 2: padding labelled -100.'''
        return DataLoader(lm_examples(8, seed=3, min_len=4, max_len=12), batch_size=2, collate_fn=pad_lm)
    """
)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch
    from capture_helpers import RankInterleaved, ddp_loader, loader, quiet
    from post_fit_modules import ShardedLoRA, ShardedTiny, fixed_length_lm, padded_lm
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from safetensors.torch import save_file

    from lightning_merge.callbacks import CurvatureCapture
    from lightning_merge.capture.post_fit import post_fit_fisher

    quiet()
    root = Path(sys.argv[1])


    def trainer_for(folder, callbacks, checkpoints=False):
        return Trainer(default_root_dir=str(folder), max_steps=3, accelerator="cpu", devices=2,
                       strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                       callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, logger=False,
                       use_distributed_sampler=False, enable_checkpointing=checkpoints)


    capture = CurvatureCapture(fisher_after_fit="exact", fisher_loader=loader(16, 4, seed=1), fisher_examples=16,
                               gram="after_fit", dirpath=str(root / "tiny"))
    trainer = trainer_for(root / "tiny", [capture])
    module = ShardedTiny(lr=1e-2)
    trainer.fit(module, ddp_loader(32, 4))
    rank = torch.distributed.get_rank()
    passes = {"example-uneven": ("example", loader(12, 4, seed=1), 12),  # rank 0 reads 6 examples, rank 1 four
              "true": ("true", loader(16, 4, seed=1), 16), "exact": ("exact", loader(16, 4, seed=1), 16)}
    for name, (estimator, batches, examples) in passes.items():
        result = post_fit_fisher(trainer, module, estimator=estimator, loader=batches, examples=examples, samples=2,
                                 seed=3)
        whole = {n: t.full_tensor().contiguous() for n, t in result.values.items()}  # every rank gathers
        if rank == 0:
            save_file(whole, str(root / f"pass-{name}.safetensors"), {"count": str(result.count)})

    lora = CurvatureCapture(fisher_after_fit="example", fisher_loader=padded_lm(), fisher_examples=8)
    checkpoints = ModelCheckpoint(dirpath=str(root / "lora" / "ck"), every_n_train_steps=1, save_top_k=1,
                                  monitor="score", mode="max")
    lm = ShardedLoRA(lr=1e-2)
    fit = trainer_for(root / "lora", [lora, checkpoints], checkpoints=True)
    fit.fit(lm, fixed_length_lm(8, 1, RankInterleaved(8)))

    # rank 0 cannot write an adapter folder (a folder lightning-merge did not write is in the way): every rank raises
    from lightning_merge.capture.sharded import write_adapter_gathered
    from lightning_merge.formats.adapter import find_adapter

    foreign = root / "foreign.adapter"
    if rank == 0:
        foreign.mkdir()
        (foreign / "notes.txt").write_text("not ours")
    torch.distributed.barrier()
    peft_model, keys = find_adapter(lm, None)
    try:
        write_adapter_gathered(foreign if rank == 0 else None, peft_model, None, {}, {}, keys=keys,
                               compression="float32", metadata={}, share=fit.strategy.broadcast)
    except Exception as err:
        Path(root, f"raised-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    Path(root, f"done-{rank}.txt").write_text("ok")

    from capture_helpers import close_process_group

    close_process_group()
    """
)


def _reference(root: Path) -> None:
    """The same fits in one process, with global batches: the Tiny classifier (batches of 8) and the LoRA Llama
    (batches of 2)."""
    from capture_helpers import loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from post_fit_modules import ShardedLoRA, ShardedTiny, fixed_length_lm, padded_lm

    from lightning_merge.callbacks import CurvatureCapture

    capture = CurvatureCapture(fisher_after_fit="exact", fisher_loader=loader(16, 4, seed=1), fisher_examples=16,
                               gram="after_fit", dirpath=str(root / "tiny"), async_write=False)
    trainer(root / "tiny", [capture], max_steps=3, max_epochs=None).fit(ShardedTiny(lr=1e-2), loader(32, 8))
    lora = CurvatureCapture(fisher_after_fit="example", fisher_loader=padded_lm(), fisher_examples=8,
                            async_write=False)
    checkpoints = ModelCheckpoint(dirpath=str(root / "lora" / "ck"), every_n_train_steps=1, save_top_k=1,
                                  monitor="score", mode="max")
    trainer(root / "lora", [lora, checkpoints], max_steps=3, max_epochs=None).fit(ShardedLoRA(lr=1e-2),
                                                                                  fixed_length_lm(8, 2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp_post_fit")
    (tmp_path / "post_fit_modules.py").write_text(MODULES)
    sys.path.insert(0, str(tmp_path))
    try:
        _reference(tmp_path / "one")
    finally:
        sys.path.remove(str(tmp_path))
    root = tmp_path / "fsdp"
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = run_sharded_script([sys.executable, str(script), str(root)], root, timeout=480, env=env, cwd=HELPERS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "done-0.txt").exists() and (root / "done-1.txt").exists()
    return tmp_path / "one", root, tmp_path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from lightning_merge.files.safetensors import load_tensors

    return load_tensors(path)


def _assert_same_files(got: Path, ref: Path, rtol: float = 1e-5, atol: float = 1e-7) -> float:
    """The two safetensors files hold the same keys and values; returns the largest absolute difference."""
    a, b = _tensors(got), _tensors(ref)
    assert sorted(a) == sorted(b), f"{got.name}: keys differ"
    worst = 0.0
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=f"{got}: {key}")
        worst = max(worst, float((a[key] - b[key]).abs().max()) if a[key].numel() else 0.0)
    return worst


def test_post_fit_fisher_and_grams_under_fsdp2_equal_one_process(runs):
    from lightning_merge.formats.sidecar import Statistics

    one, fsdp, _ = runs
    worst = _assert_same_files(fsdp / "tiny" / "final.statistics.safetensors",
                               one / "tiny" / "final.statistics.safetensors")
    _assert_same_files(fsdp / "tiny" / "final.safetensors", one / "tiny" / "final.safetensors")
    got = Statistics.load(fsdp / "tiny" / "final.statistics.safetensors")
    ref = Statistics.load(one / "tiny" / "final.statistics.safetensors")
    assert {k.split("/")[0] for k in got.keys()} == {"exp_avg_sq", "fisher.batch", "fisher.exact", "gram"}
    assert got.kinds["fisher.exact"]["count"] == ref.kinds["fisher.exact"]["count"] == 16
    assert got.kinds["gram"]["count"] == ref.kinds["gram"]["count"] == {"net.0.weight": 16, "net.2.weight": 16}
    assert got.kinds["gram"]["examples"] == 16
    assert worst < 1e-5


def _per_rank_reference(model, estimator: str, examples: int, seed: int):
    """compute_fisher in one process as DDP's pass runs it: rank r reads every other batch of the loader up to
    ceil(M / 2) examples, its true-Fisher labels drawn from ``seed + r``; the sums added, divided by the count."""
    from capture_helpers import loader

    from lightning_merge.capture.fisher import compute_fisher

    batches = list(loader(examples, 4, seed=1))
    total, count = None, 0
    for rank in (0, 1):
        sums, n = compute_fisher(model, batches[rank::2], estimator=estimator, num_examples=-(-examples // 2),
                                 samples=2, seed=seed + rank)
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
        count += n
    return {k: v / count for k, v in total.items()}, count


@pytest.mark.parametrize("name,estimator,examples", [("example-uneven", "example", 12), ("true", "true", 16),
                                                     ("exact", "exact", 16)])
def test_each_post_fit_estimator_on_the_sharded_model_equals_one_process(runs, name, estimator, examples):
    from capture_helpers import Tiny
    from safetensors import safe_open

    from lightning_merge.files.safetensors import load_tensors

    _, fsdp, _ = runs
    model = Tiny()
    model.load_state_dict(load_tensors(fsdp / "tiny" / "final.safetensors"))  # the sharded fit's weights
    ref, count = _per_rank_reference(model, estimator, examples, seed=3)
    path = fsdp / f"pass-{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert int(f.metadata()["count"]) == count == (10 if name == "example-uneven" else 16)
    got = _tensors(path)
    assert sorted(got) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
        assert got[key].abs().sum() > 0


def _config(folder: Path) -> dict:
    """The adapter's PEFT config; ``target_modules`` sorted (PEFT keeps a set: its order follows string hashing,
    which differs between processes)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return config


def test_lora_adapter_folders_under_fsdp2_equal_one_process(runs):
    from lightning_merge.formats.sidecar import Statistics

    one, fsdp, _ = runs
    for sub in ("ck/final.adapter", "ck/epoch=0-step=3.adapter"):
        got, ref = fsdp / "lora" / sub, one / "lora" / sub
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
        _assert_same_files(got / "adapter_model.safetensors", ref / "adapter_model.safetensors", rtol=1e-5, atol=1e-6)
        _assert_same_files(got / "statistics.safetensors", ref / "statistics.safetensors", rtol=1e-4, atol=1e-7)
        assert _config(got) == _config(ref)
        stats = Statistics.load(got / "statistics.safetensors")
        keys = {k.split("/", 1)[1] for k in stats.keys()}
        assert keys == set(_tensors(got / "adapter_model.safetensors"))  # keyed like the adapter
        assert len(keys) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    kinds = Statistics.load(fsdp / "lora" / "ck" / "final.adapter" / "statistics.safetensors").kinds
    assert set(kinds) == {"exp_avg_sq", "fisher.batch", "fisher.example"}
    assert kinds["fisher.example"]["count"] == 8
    ck = fsdp / "lora" / "ck"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("epoch=")) == [
        "epoch=0-step=3.adapter", "epoch=0-step=3.ckpt", "epoch=0-step=3.statistics.safetensors"]  # rotated
    assert not (ck / "final.safetensors").exists()  # a PEFT model's fit end writes the adapter only


def test_a_peft_model_loads_the_adapter_written_under_fsdp2(runs):
    import peft
    import transformers

    _, fsdp, tmp_path = runs
    sys.path.insert(0, str(tmp_path))
    try:
        from post_fit_modules import llama_config
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config())
    loaded = peft.PeftModel.from_pretrained(base, str(fsdp / "lora" / "ck" / "final.adapter"))
    stored = _tensors(fsdp / "lora" / "ck" / "final.adapter" / "adapter_model.safetensors")
    state = peft.get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value)


def test_an_adapter_folder_rank_zero_cannot_write_fails_every_rank(runs):
    _, fsdp, _ = runs
    assert sorted(p.name for p in (fsdp / "foreign.adapter").iterdir()) == ["notes.txt"]  # left as it was
    assert "foreign.adapter" in (fsdp / "raised-0.txt").read_text()
    assert "failed on rank 0" in (fsdp / "raised-1.txt").read_text()
    assert "foreign.adapter" in (fsdp / "raised-1.txt").read_text()
    assert not [p for p in fsdp.iterdir() if p.name.startswith(".foreign.adapter")]  # no temporary sibling left
