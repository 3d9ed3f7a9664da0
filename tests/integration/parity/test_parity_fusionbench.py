"""OPCM, DOP and TALL masks against FusionBench's implementations (PyPI fusion-bench, `fusion_bench/method/opcm`,
`dop`, `tall_mask`) on the same inputs, order (no shuffling) and arguments; the OPCM and DOP references run in one
process of FusionBench's environment. Runs when a fusion-bench environment is found (``.venv-fusionbench`` or
``FUSION_BENCH_PYTHON``); FusionBench is a reference only, never a dependency."""

import json

import pytest
import torch
from conftest import FUSION_BENCH, HELPERS, fusion_bench_runs

from lightning_merge import DOP, OPCM, merge
from lightning_merge.strategies import functional as F
from lightning_merge.strategies.opcm import DEFAULT_NOT_LINEAR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(FUSION_BENCH is None, reason="fusion-bench not installed (set FUSION_BENCH_PYTHON)")]


DOP_DEFAULTS = dict(lr=1e-4, num_steps=200, mgda=True, ema=True, ema_beta=0.999, alpha=0.8, svd_epsilon=0.99999,
                   svd_proj_space="uv")
ALPHAS = [0.5, 0.8, 0.95]  # at 1.0 FusionBench's r is float32 rounding noise
DOP_OPTIONS = [
    {},  # FusionBench's configuration (method/dop/dop.yaml)
    {"mgda": False, "svd_proj_space": "v", "svd_epsilon": 0.9},
    {"ema": False, "svd_proj_space": "u", "lr": 1e-3},
]

#: runs every reference job in one process of FusionBench's environment (fusion_bench imports in seconds)
_JOBS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fusionbench_dop_reference as dop
import fusionbench_opcm_reference as opcm
for kind, *args in json.loads(sys.argv[2]):
    (opcm if kind == "opcm" else dop).main(*args)
"""


def _experts(folder, n: int, seed: int, kind: str = "sequential"):
    """A base and ``n`` experts (base + 0.1 noise) of the reference's module, saved in ``folder`` as it reads them."""
    from fusionbench_opcm_reference import build as reference_build

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = reference_build(kind)
    torch.save(base.state_dict(), folder / "base.pt")
    experts = []
    for i in range(n):
        expert = reference_build(kind)
        expert.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
        torch.save(expert.state_dict(), folder / f"expert{i}.pt")
        experts.append(expert.state_dict())
    return base.state_dict(), experts


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """FusionBench's merges of every case below, made in one process: {case: (base, experts, reference)}."""
    root = tmp_path_factory.mktemp("fusionbench")
    cases, jobs = {}, []
    for alpha in ALPHAS:
        folder = root / f"opcm-{alpha}"
        cases[("opcm", alpha)] = (folder, *_experts(folder, 5, 0))
        jobs.append(("opcm", str(folder), alpha, 5))
    folder = root / "opcm-lm"
    cases[("opcm", "lm")] = (folder, *_experts(folder, 4, 1, "lm"))
    jobs.append(("opcm", str(folder), 0.5, 4, "lm"))
    for i, options in enumerate(DOP_OPTIONS):
        folder = root / f"dop-{i}"
        cases[("dop", i)] = (folder, *_experts(folder, 4, 0))
        jobs.append(("dop", str(folder), 4, json.dumps({**DOP_DEFAULTS, **options})))
    fusion_bench_runs(_JOBS, [[HELPERS, json.dumps(jobs)]], root)
    return {case: (base, experts, torch.load(folder / "fusionbench.pt", weights_only=True))
            for case, (folder, base, experts) in cases.items()}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_opcm_matches_fusionbench(references, alpha):
    base, experts, reference = references[("opcm", alpha)]
    # FusionBench projects nn.Linear weights only: here "1.weight" and "3.weight"; the embedding "0.weight" is not
    not_linear = DEFAULT_NOT_LINEAR + r"|^0\.weight$"
    ours = merge(experts, base=base, strategy=OPCM(alpha=alpha, not_linear=not_linear))
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    print(f"alpha={alpha}: largest difference from FusionBench {worst:.2e}")
    assert worst < 1e-5, worst


def test_opcm_default_projects_lm_head_as_fusionbench(references):
    """FusionBench projects every nn.Linear, the output head included; only embeddings (nn.Embedding) and other
    modules are added unprojected. OPCM's default does the same on a causal LM's names (issue 33)."""
    base, experts, reference = references[("opcm", "lm")]
    ours = merge(experts, base=base, strategy=OPCM(alpha=0.5))
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    print(f"lm_head: largest difference from FusionBench {worst:.2e}")
    assert worst < 1e-5, worst


@pytest.mark.parametrize("index", range(len(DOP_OPTIONS)))
def test_dop_matches_fusionbench(references, index):
    """DOP against FusionBench's own ``ContinualDOPForCLIP._layer_wise_optimize`` (its Adam steps, losses, MGDA
    solver and averages) in the loop of its ``run``, 4 experts in order, on the CPU. Not bit for bit: we optimise
    task vectors (x − τᵢ) where it optimises weights (W − Wᵢ), so the losses' inputs differ in the last bits;
    200 Adam steps keep that near 1e-6 relative (measured ≤ 1.7e-6)."""
    options = {**DOP_DEFAULTS, **DOP_OPTIONS[index]}
    base, experts, reference = references[("dop", index)]
    not_linear = DEFAULT_NOT_LINEAR + r"|^0\.weight$"  # FusionBench averages the nn.Embedding "0.weight"
    ours = merge(experts, base=base, strategy=DOP(**options, not_linear=not_linear, device="cpu"))
    averaged = merge(experts, base=base, strategy=DOP(**{**options, "num_steps": 0}, not_linear=not_linear,
                                                      device="cpu"))
    for k in reference:
        worst = float((ours[k] - reference[k]).abs().max()) / float(reference[k].abs().max())
        print(f"{options}: {k} relative difference from FusionBench {worst:.2e}")
        assert worst < 1e-5, (k, worst)
    for k in ("1.weight", "3.weight"):  # the optimised weights moved far more than the difference
        assert float((reference[k] - averaged[k]).abs().max()) > 1e-3


TALL_SCRIPT = """
import sys, torch
from fusion_bench.method.tall_mask.utils import generate_task_masks
d = torch.load(sys.argv[1], weights_only=True)
masks = generate_task_masks(d["tau"], d["ft"], d["base"], tv=d["mtl"], tall_mask_lambda=float(sys.argv[3]))
torch.save(masks, sys.argv[2])
"""


def _tall_case():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(30, 20, generator=g, dtype=torch.float64), "b": torch.randn(17, generator=g,
                                                                                           dtype=torch.float64)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
               for _ in range(4)]
    return base, experts


TALL_LAMBDAS = (0.2, 0.6)


@pytest.fixture(scope="module")
def tall_references(tmp_path_factory):
    """FusionBench's TALL masks of the case above at each λ, from one FusionBench process."""
    folder = tmp_path_factory.mktemp("tall")
    base, experts = _tall_case()
    flat_base = torch.cat([v.reshape(-1) for v in base.values()])
    flat_ft = torch.stack([torch.cat([e[k].reshape(-1) for k in base]) for e in experts])
    tau = flat_ft - flat_base
    torch.save({"tau": tau, "ft": flat_ft, "base": flat_base, "mtl": tau.sum(0)}, folder / "in.pt")
    fusion_bench_runs(TALL_SCRIPT, [[folder / "in.pt", folder / f"out{lam}.pt", lam] for lam in TALL_LAMBDAS], folder)
    return {lam: torch.load(folder / f"out{lam}.pt", weights_only=True) for lam in TALL_LAMBDAS}


@pytest.mark.parametrize("lam", TALL_LAMBDAS)
def test_tall_masks_match_fusionbench(tmp_path, tall_references, lam):
    """Our TALL masks (the Consensus strategy and tall.compress) against FusionBench's port of the paper's code,
    ``fusion_bench.method.tall_mask.utils.generate_task_masks``, on flattened models (float64)."""
    from lightning_merge.tools import tall

    base, experts = _tall_case()
    flat_base = torch.cat([v.reshape(-1) for v in base.values()])
    flat_ft = torch.stack([torch.cat([e[k].reshape(-1) for k in base]) for e in experts])
    tau = flat_ft - flat_base
    reference = tall_references[lam]

    comp = tall.compress(experts, base, tmp_path / "tall", tall_lambda=lam)
    ours = torch.stack([torch.cat([comp.mask(i, k).reshape(-1) for k in base]) for i in range(4)])
    mismatches = int((ours != reference).sum())
    print(f"lambda={lam}: {mismatches} of {ours.numel()} mask entries differ from FusionBench")
    # float32 storage of τ_MTL versus FusionBench's float64 can flip entries exactly at the boundary only
    assert mismatches <= ours.numel() * 1e-3
    exact = torch.stack([F.tall_masks(tau, tau.sum(0), [lam] * 4)[i] for i in range(4)])
    assert torch.equal(exact, reference)
