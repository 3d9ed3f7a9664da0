"""Every strategy of the package, by default and once per option that changes what it is: the registry's round-trip
test and the row-chunk property test draw from these."""

from __future__ import annotations

from lightning_merge import strategies as S
from lightning_merge.strategies import STRATEGIES


def library() -> list[str]:
    """The names the package registers (tests register their own)."""
    return sorted(k for k, cls in STRATEGIES.items() if cls.__module__.startswith("lightning_merge."))


# every option that changes what a strategy is, once: from_dict(to_dict(s)) must rebuild each exactly
VARIANTS = [
    S.Linear(weights=[0.2, 0.8], normalize=False),
    S.TaskArithmetic(weights=[1.0, 0.5], scale=0.3, weighting="ota"),
    S.Ties(density=[0.1, 0.3], topk="model", election="unweighted", rescale="l1", weighting="fisher"),
    S.Dare(drop_rate=[0.5, 0.2], combine="ties", seed=3),
    S.Breadcrumbs(density=0.8, gamma=[0.02, 0.05], election="weighted"),
    S.Cabs(n=2, m=8, order=[1, 0], weights=[1.2, 1.2]),
    S.Cabs(n=6, m=8, last_group="pad", overlap="free_only"),
    S.Cabs(n=3, m=8, last_group="drop"),
    S.Generalized(sparsification="saliency", density=0.3, saliency="fisher", consensus_k=1, tall_lambda=[0.4, 0.5]),
    S.Consensus.tall_reference(consensus_k=3, density=0.1, scale=0.7),
    S.LiNeS(inner=S.Ties(density=0.4), alpha=0.5, beta=0.25, pattern=r"blocks\.(\d+)"),
    S.Fisher(weights=[1, 2], scale=1.5, floor=0.0, eps=1e-8, normalize=False, estimator="example", favor_target=True),
    S.OTA(power=1.0, mean_normalize=True, threshold=[0.1, 0.2]),
    S.OTA(weights=[1.0, 2.0], bias_correct=False),  # row-local: the raw exp_avg_sq read by rows
    S.WeightedMedian(kappa=0.5, importance="none", normalize=True),
    S.OPCM(alpha=0.7, not_linear=r"head", device="cpu"),
    S.DOP(lr=1e-3, num_steps=20, mgda=False, ema=False, ema_beta=0.9, alpha=0.6, svd_epsilon=0.9,
          svd_proj_space="u", not_linear=r"head", device="cpu"),
    S.PCB(ratio=0.2, clamp_ratio=0.01, scale=0.9),
    S.RegMean(alpha=0.5, weights=[1.0, 3.0], scale=1.2),
    S.CATMerging(scale=0.7, lambd=1.0, ratio=0.5, ratio_bias=0.2, norm_pattern=None),
    S.TSVMerge(weights=[1.0, 0.5], not_svd=r"lm_head"),
    S.IsoC(scale=1.4, not_svd=r"lm_head"),
    S.IsoCTS(common_space_fraction=0.5, scale=1.2, not_svd=r"embed"),
    S.WUDI(iterations=50, lr=1e-4, solver="exact", scale=0.9, not_svd=r"lm_head", device="cpu"),
    S.DogeTA(lamda=0.2, density=0.5, subspace=2.0, iterations=30, lr=1e-3, scale=0.9, not_svd=r"lm_head",
             others="mean", device="cpu"),
    S.WIDEN(above_average_value_ratio=1.5, score_calibration_value=0.5, scale=0.9, embeddings=r"wte"),
    S.TSVMerge(metric="gram", alpha=0.5, damping=0.1),
    S.TSVMerge(metric="fisher.batch", damping=0.0, mask="exp_avg_sq", density=0.3),
    S.LayerwiseTaskArithmetic(coefficients={"0": [0.3, 0.7], "1": [0.5, 0.5]}, default=[1.0, 0.2], scale=0.8),
    S.Slerp(t=0.3),
    S.NuSlerp(weights=[1.0, 0.6], nuslerp_flatten=False, nuslerp_row_wise=True),
    S.MultiSlerp(weights=[1.0, 0.5, 2.0], normalize_weights=False, eps=1e-6),
    S.Karcher(max_iter=20, tol=1e-7),
    S.ModelStock(filter_wise=True),
    S.NearSwap(t=0.001),
    S.ArceeFusion(),
    S.Della(density=[0.4, 0.6], epsilon=0.1, combine="linear", rescale="inverse", seed=3),
    S.SCE(select_topk=0.3, scale=0.9),
    S.RAM(epsilon=0.01),
    S.RAMPlusTL(r=0.5, alpha=0.3, epsilon=0.01),
    S.PerTensor(strategies=[S.Ties(density=0.5), S.SCE()], tensors={"layers.0.w": 1}, default=0),
]



def library_defaults() -> list:
    """Each of the package's strategies with its defaults."""
    return [STRATEGIES[n]() for n in library()]
