"""OPCM against FusionBench's implementation (PyPI fusion-bench, `fusion_bench/method/opcm`) on the same inputs,
order (no shuffling) and α. Runs when a fusion-bench environment is found (``.venv-fusionbench`` or
``FUSION_BENCH_PYTHON``); FusionBench is a reference only, never a dependency."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from lightning_merge import OPCM, merge
from lightning_merge.strategies.continual import DEFAULT_NOT_LINEAR

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [os.environ.get("FUSION_BENCH_PYTHON"), str(ROOT / ".venv-fusionbench" / "bin" / "python")]
PYTHON = next((c for c in CANDIDATES if c and Path(c).exists()), None)
pytestmark = pytest.mark.skipif(PYTHON is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")


def build():
    from fusionbench_opcm_reference import build as reference_build

    return reference_build()


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_opcm_matches_fusionbench(tmp_path, alpha):
    torch.manual_seed(0)
    base = build()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    experts = []
    for i in range(5):
        expert = build()
        expert.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
        torch.save(expert.state_dict(), tmp_path / f"expert{i}.pt")
        experts.append(expert.state_dict())
    subprocess.run(
        [PYTHON, str(Path(__file__).with_name("fusionbench_opcm_reference.py")), str(tmp_path), str(alpha), "5"],
        check=True,
        cwd=tmp_path,
    )
    reference = torch.load(tmp_path / "fusionbench.pt", weights_only=True)
    # FusionBench projects nn.Linear weights only: here "1.weight" and "3.weight"; the embedding "0.weight" is not
    not_linear = DEFAULT_NOT_LINEAR + r"|^0\.weight$"
    ours = merge(experts, base=base.state_dict(), strategy=OPCM(alpha=alpha, not_linear=not_linear))
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    print(f"alpha={alpha}: largest difference from FusionBench {worst:.2e}")
    assert worst < 1e-5, worst
