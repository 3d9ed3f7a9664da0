"""A rank that raises inside a merge callback never leaves the other ranks waiting: every rank raises.

The ranks must be independent processes, as under ``torchrun`` or Lightning's ``ddp`` (subprocess) launcher: under
``ddp_spawn`` the launcher kills the other workers when one fails, which hides a hang. Each fit runs as a script in a
subprocess with a time limit, so a hang fails the test instead of stalling CI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import HELPERS

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from capture_helpers import ExplodingFoldStrategy, ExplodingStrategy, NegativeValTiny, Tiny, ddp_loader, quiet
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_merge.callbacks import CheckpointAveraging, ContinualMerge, MergeOnFitEnd

    quiet()
    which, root, base = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = os.environ.get("LOCAL_RANK", "0")
    callbacks = {
        "merge": lambda: [MergeOnFitEnd(experts=[base], strategy=ExplodingStrategy(), base=base, dirpath=root)],
        "continual": lambda: [ContinualMerge(state=root + "/state", base=base, strategy=ExplodingFoldStrategy())],
        "average": lambda: [ModelCheckpoint(dirpath=root + "/ckpt", monitor="val_score", mode="max"),
                            CheckpointAveraging(select="top_k", k=1, weighting="mwa", mode="max")],
    }[which]()
    trainer = Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", strategy="ddp", devices=2,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, logger=False,
                      use_distributed_sampler=False)
    try:
        module = NegativeValTiny(lr=1e-2) if which == "average" else Tiny(lr=1e-2)
        trainer.fit(module, ddp_loader(16, 4), ddp_loader(8, 4, seed=1))
    except Exception as err:  # rank 0 survives its error, as in a notebook: the others must not wait for it
        Path(root, f"raised-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        other = "1" if rank == "0" else "0"
        # each rank waits for the other's file before exiting: Lightning's child-process observer in rank 0
        # SIGKILLs rank 0 as soon as rank 1 exits non-zero, which must not happen before rank 0 has written
        for _ in range(300):
            if Path(root, f"raised-{other}.txt").exists():
                break
            time.sleep(0.1)
        else:
            print(f"rank {other} is still waiting", file=sys.stderr)
            os._exit(3)
        os._exit(1)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("which,message", [
    ("merge", "boom at rank zero"),
    ("continual", "boom while folding"),
    ("average", "metrics-weighted averaging needs positive finite metrics"),
])
def test_a_failure_on_rank_zero_raises_on_every_rank(tmp_path, which, message):
    import torch
    from capture_helpers import Tiny

    from lightning_merge.files.safetensors import save_tensors

    save_tensors(tmp_path / "base.safetensors", Tiny().state_dict())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    try:
        done = subprocess.run(
            [sys.executable, str(script), which, str(tmp_path), str(tmp_path / "base.safetensors")],
            capture_output=True, text=True, timeout=90, env=env, cwd=HELPERS, start_new_session=True,
        )
    except subprocess.TimeoutExpired as err:
        subprocess.run(["pkill", "-f", str(script)], check=False)
        pytest.fail(f"{which}: a rank waited forever after rank 0 failed ({err})")
    # 1: rank 0 exited with its error; -9: Lightning's observer killed rank 0 after rank 1 exited (both had raised)
    assert done.returncode in (1, -9), done.stderr[-2000:]
    assert message in (tmp_path / "raised-0.txt").read_text()
    assert message in (tmp_path / "raised-1.txt").read_text()  # rank 1 raised too, quoting rank 0's error
    del torch
