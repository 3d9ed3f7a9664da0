"""A merge split over the ranks of a torch.distributed process group (gloo, spawned processes) writes the same
bytes as one process, for strategies with model-wide first passes; a rank that fails makes every rank fail and
leaves no output; the CLI's --nproc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_lora_family

from lightning_merge import OPCM, PCB, Dare, Fisher, Linear, LiNeS, TaskArithmetic, Ties, merge
from lightning_merge.engine.distributed import Distribution, spawn
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import write_statistics

SHAPES = {"embed.weight": (40, 16), "layers.0.weight": (16, 16), "layers.0.bias": (16,), "layers.1.weight": (24, 16),
          "layers.1.bias": (24,), "head.weight": (5, 24)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(3):
        path = root / f"e{i}.safetensors"
        save_tensors(path, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        write_statistics(root / f"e{i}.statistics.safetensors",
                         {"fisher.batch": {k: torch.rand(s, generator=g) + 0.05 for k, s in SHAPES.items()}},
                         {"fisher.batch": {"count": 4, "batch_size": 2}})
        paths.append(str(path))
    return root, str(root / "base.safetensors"), paths


def _distributed(nproc, experts, base, strategy, out, **kwargs):
    from distributed_helpers import merge_rank

    spec = json.dumps({"experts": experts, "base": base, "strategy": strategy.to_dict(), "out": str(out), **kwargs})
    spawn(nproc, merge_rank, (spec,))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {folder.name:
                                                                                                 folder.read_bytes()}


def test_the_assignment_balances_bytes_and_covers_every_tensor():
    class Fake(Distribution):
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

    sizes = [("a", 100), ("b", 60), ("c", 50), ("d", 40), ("e", 10)]
    parts = [Fake(r, 2).assign(sizes) for r in range(2)]
    assert parts[0] | parts[1] == {"a", "b", "c", "d", "e"} and not parts[0] & parts[1]
    # largest first, each to the least loaded rank: a→0, b→1, c→1 (60 < 100), d→0 (100 < 110), e→1 (110 < 140)
    assert parts[0] == {"a", "d"} and parts[1] == {"b", "c", "e"}
    assert [sum(n for name, n in sizes if name in p) for p in parts] == [140, 120]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    Ties(density=0.3, topk="model"), Fisher(), Dare(drop_rate=0.5, seed=3), LiNeS(TaskArithmetic()), OPCM(),
    PCB(ratio=0.2),
], ids=lambda s: s.name)
def test_two_ranks_write_the_bytes_of_one_process(family, tmp_path, strategy):
    root, base, experts = family
    one = merge(experts, base, strategy, tmp_path / "one" / "merged", shard_size=2000)
    _distributed(2, experts, base, strategy, tmp_path / "two" / "merged", shard_size=2000)
    a, b = _files(one), _files(tmp_path / "two" / "merged")
    assert len([n for n in a if n.startswith("model-")]) >= 2  # sharded: ranks write into shared shards
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


@pytest.mark.slow
def test_a_single_file_from_three_ranks(family, tmp_path):
    root, base, experts = family
    one = merge(experts, base, Ties(density=0.3, topk="model"), tmp_path / "one.safetensors")
    _distributed(3, experts, base, Ties(density=0.3, topk="model"), tmp_path / "three.safetensors")
    assert Path(one).read_bytes() == (tmp_path / "three.safetensors").read_bytes()


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_and_leaves_no_output(family, tmp_path):
    root, base, experts = family
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom on layers.1.weight"):
        _distributed(2, experts, base, Linear(), out, fail_on="layers.1.weight")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".failed")]  # no partial output left


def test_outputs_a_distributed_merge_cannot_write_are_refused_before_anything_starts(family, tmp_path):
    root, base, experts = family
    with pytest.raises(ValueError, match="not initialised"):
        merge(experts, base, Linear(), tmp_path / "x", group="world")
    for out in (tmp_path / "x.ckpt", None, "s3://bucket/x"):
        with pytest.raises(ValueError, match="a distributed merge writes safetensors"):
            merge(experts, base, Linear(), out, group="world")


@pytest.mark.slow
def test_cli_nproc(family, tmp_path, capsys):
    from lightning_merge.cli.commands import main

    root, base, experts = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: fisher\n" + f"base_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {e}\n" for e in experts))
    assert main(["merge", str(recipe), str(tmp_path / "one" / "merged")]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "two" / "merged"), "--nproc", "2"]) == 0
    assert _files(tmp_path / "one" / "merged") == _files(tmp_path / "two" / "merged")
    assert "with 2 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_under_torchrun(family, tmp_path):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    root, base, experts = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: ties\n" + f"base_model: {base}\nparameters: {{density: 0.3}}\nmodels:\n"
                      + "".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}\n" for e in experts))
    one = tmp_path / "one" / "merged"
    merge_one = subprocess.run([sys.executable, "-m", "lightning_merge", "merge", str(recipe), str(one)],
                               capture_output=True, text=True, timeout=120)
    assert merge_one.returncode == 0, merge_one.stderr[-2000:]
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "lightning_merge", "merge", str(recipe),
                           str(tmp_path / "two" / "merged")], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(tmp_path / "one" / "merged") == _files(tmp_path / "two" / "merged")
    assert done.stderr.count("merged 3 experts") == 1  # rank 0 reports; the others are quiet


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama base and three LoRA adapters over it (different ranks and targets)."""
    base, paths = write_lora_family(tmp_path_factory.mktemp("dist-lora"), 3)
    return str(base), [str(p) for p in paths]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,rank", [(TaskArithmetic(scale=0.7), None), (TaskArithmetic(), 3),
                                           (Ties(density=0.5), 3)], ids=["exact", "svd-linear", "svd-ties"])
def test_a_peft_adapter_output_from_two_ranks_is_the_one_process_adapter(adapters, tmp_path, strategy, rank):
    base, paths = adapters
    one = merge(paths, base, strategy, tmp_path / "one" / "merged", output="peft", rank=rank)
    _distributed(2, paths, base, strategy, tmp_path / "two" / "merged", output="peft", rank=rank)
    a, b = _files(Path(one)), _files(tmp_path / "two" / "merged")
    assert a.keys() == b.keys() and "adapter_model.safetensors" in a
    for name in a:
        assert a[name] == b[name], name
