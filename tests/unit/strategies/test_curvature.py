"""Fisher, OTA (+ Fast Fisher Grafting) and WeightedMedian: formulas and the sanity properties of ALGORITHMS.md,
on values, per tensor and through merge()."""

from __future__ import annotations

import pytest
import torch
from conftest import rand

from lightning_merge import OTA, ContinualState, Expert, Fisher, StatisticsError, WeightedMedian, merge
from lightning_merge.files.safetensors import save_tensors
from lightning_merge.formats.sidecar import Statistics, write_statistics
from lightning_merge.strategies import Strategy
from lightning_merge.strategies.curvature import weighted_median


def experts_with(stats_kind, n=3, shape=(4, 5), seed=0, positive=True):
    base = {"w": rand(*shape, seed=seed), "b": rand(shape[0], seed=seed + 1)}
    experts, raw = [], []
    for i in range(n):
        sd = {k: v + 0.1 * rand(*v.shape, seed=seed + 10 + 2 * i + j) for j, (k, v) in enumerate(base.items())}
        st = {
            k: rand(*v.shape, seed=seed + 100 + 2 * i + j).abs() + (0.01 if positive else 0.0)
            for j, (k, v) in enumerate(base.items())
        }
        experts.append(Expert(sd, statistics={stats_kind: st}, name=f"e{i}"))
        raw.append((sd, st))
    return Expert(base, name="base"), experts, raw


# -- Fisher ---------------------------------------------------------------------------------------------------------
def test_fisher_formula_with_model_wide_normalisation():
    base, experts, raw = experts_with("fisher")
    got = merge(experts, base=base, strategy=Fisher(weights=[1.0, 2.0, 0.5], floor=0.0))
    norms = [torch.sqrt(sum((st[k].double() ** 2).sum() for k in st)).item() for _, st in raw]
    lam = [w / n for w, n in zip([1.0, 2.0, 0.5], norms)]
    for k in ("w", "b"):
        num = sum(lam_i * st[k] * sd[k] for lam_i, (sd, st) in zip(lam, raw))
        den = sum(lam_i * st[k] for lam_i, (sd, st) in zip(lam, raw))
        torch.testing.assert_close(got[k], num / den, rtol=1e-5, atol=1e-6)


def test_fisher_sanity_properties():
    base, experts, raw = experts_with("fisher")
    # equal Fishers: the λ-weighted average
    same = [Expert(sd, statistics={"fisher": raw[0][1]}) for sd, _ in raw]
    got = merge(same, strategy=Fisher(weights=[1.0, 3.0, 1.0], normalize=False))
    for k in ("w", "b"):
        expected = (raw[0][0][k] + 3 * raw[1][0][k] + raw[2][0][k]) / 5
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    # with normalisation, scaling one expert's Fisher changes nothing (floor 0)
    scaled = [
        Expert(sd, statistics={"fisher": {k: v * (1000.0 if i == 1 else 1.0) for k, v in st.items()}})
        for i, (sd, st) in enumerate(raw)
    ]
    a = merge(experts, strategy=Fisher(floor=0.0))
    b = merge(scaled, strategy=Fisher(floor=0.0))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # where one expert alone has Fisher mass, its value wins
    only = [
        Expert(sd, statistics={"fisher": {k: (v if i == 2 else torch.zeros_like(v)) for k, v in st.items()}})
        for i, (sd, st) in enumerate(raw)
    ]
    got = merge(only, strategy=Fisher(floor=0.0, normalize=False))
    torch.testing.assert_close(got["w"], raw[2][0]["w"])
    # the scale moves along the merged task vector; scale 1 is the plain average
    at1 = merge(experts, base=base, strategy=Fisher())
    at2 = merge(experts, base=base, strategy=Fisher(scale=2.0))
    plain = merge(experts, strategy=Fisher())
    for k in at1:
        torch.testing.assert_close(at1[k], plain[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(at2[k] - base.tensor(k), 2 * (at1[k] - base.tensor(k)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a base"):
        merge(experts, strategy=Fisher(scale=2.0))


def test_fisher_favor_target_floors_only_the_first_expert_in_batch_and_continual(tmp_path):
    """Matena & Raffel's favor_target_model: max(F, floor) for the first expert, F for the others; where no Fisher
    covers a coordinate the first expert's value wins (the default floors every expert: the plain average)."""
    from lightning_merge import ContinualState
    from lightning_merge.formats.sidecar import sidecar_path, write_statistics

    base, experts, raw = experts_with("fisher")
    fishers = []
    for _, st in raw:
        f = {k: v.clone() for k, v in st.items()}
        f["w"][0] = 0.0  # row 0 of "w": no expert's Fisher covers it
        fishers.append(f)
    zeroed = [Expert(sd, statistics={"fisher": f}, name=f"e{i}") for i, ((sd, _), f) in enumerate(zip(raw, fishers))]
    got = merge(zeroed, base=base, strategy=Fisher(favor_target=True, normalize=False))
    floors = [1e-6, 0.0, 0.0]
    for k in ("w", "b"):
        p = [f[k].clamp(min=fl) for f, fl in zip(fishers, floors)]
        want = sum(pi * sd[k] for pi, (sd, _) in zip(p, raw)) / sum(p)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["w"][0], raw[0][0]["w"][0])  # the target wins where nothing covers
    plain = merge(zeroed, base=base, strategy=Fisher(normalize=False))
    torch.testing.assert_close(plain["w"][0], sum(sd["w"][0] for sd, _ in raw) / 3)
    # the continual form folds the same precisions: the first expert added is the target
    from safetensors.torch import save_file

    save_file({k: base.tensor(k).contiguous() for k in ("w", "b")}, str(tmp_path / "base.safetensors"))
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors",
                                  strategy=Fisher(favor_target=True, normalize=False))
    for i, ((sd, _), f) in enumerate(zip(raw, fishers)):
        path = tmp_path / f"e{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        write_statistics(sidecar_path(path), {"fisher.example": f}, {"fisher.example": {"count": 8}})
        state.add(path)
    continual = state.state_dict()
    for k in ("w", "b"):
        torch.testing.assert_close(continual[k], got[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="favor_target"):
        Fisher(favor_target="yes")


def test_missing_fisher_is_an_error_naming_the_expert_or_a_loud_uniform_fallback(caplog):
    base, experts, raw = experts_with("fisher")
    plain = Expert(raw[1][0], name="no-stats")
    with pytest.raises(StatisticsError, match="expert 'no-stats' has no 'fisher'"):
        merge([experts[0], plain], strategy=Fisher())
    got = merge([experts[0], plain], strategy=Fisher(normalize=False, floor=0.0), on_missing_statistic="uniform")
    assert "using uniform weights" in caplog.text
    st = raw[0][1]["w"]
    torch.testing.assert_close(got["w"], (st * raw[0][0]["w"] + raw[1][0]["w"]) / (st + 1), rtol=1e-5, atol=1e-6)


# -- OTA ------------------------------------------------------------------------------------------------------------
def test_ota_formula_and_power_one_is_fisher_with_v():
    base, experts, raw = experts_with("exp_avg_sq")
    got = merge(experts, base=base, strategy=OTA(scale=1.5, eps=1e-8, weights=[1.0, 0.5, 2.0]))
    for k in ("w", "b"):
        w = [lam * (st[k].sqrt() + 1e-8) for lam, (_, st) in zip([1.0, 0.5, 2.0], raw)]
        tau = [sd[k] - base.tensor(k) for sd, _ in raw]
        expected = base.tensor(k) + 1.5 * sum(a * t for a, t in zip(w, tau)) / sum(w)
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    fisher_like = [Expert(sd, statistics={"fisher": st}) for sd, st in raw]
    a = merge(experts, strategy=OTA(power=1.0, eps=0.0))
    b = merge(fisher_like, strategy=Fisher(floor=0.0, normalize=False))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # mean normalisation divides each expert's weights by their tensor mean
    got = merge(experts, strategy=OTA(mean_normalize=True, eps=0.0))
    w = [st["w"].sqrt() / st["w"].sqrt().mean() for _, st in raw]
    torch.testing.assert_close(got["w"], sum(a * sd["w"] for a, (sd, _) in zip(w, raw)) / sum(w), rtol=1e-5, atol=1e-6)


def test_fast_fisher_grafting_properties():
    base, experts, raw = experts_with("exp_avg_sq", n=3, shape=(8, 16))
    b = {k: base.tensor(k) for k in ("w", "b")}
    # threshold 0 is no mask
    a0 = merge(experts, base=base, strategy=OTA(threshold=0.0))
    plain = merge(experts, base=base, strategy=OTA())
    for k in a0:
        torch.testing.assert_close(a0[k], plain[k])
    # density: each expert keeps its top-k saliency v·τ²; masked entries leave numerator and denominator
    got = merge(experts, base=base, strategy=OTA(density=0.25, eps=0.0))
    tau = [sd["w"] - b["w"] for sd, _ in raw]
    masks = []
    for (_, st), t in zip(raw, tau):
        sal = (st["w"] * t**2).reshape(-1)
        keep = torch.zeros_like(sal, dtype=torch.bool)
        keep[torch.topk(sal, int(0.25 * sal.numel())).indices] = True
        masks.append(keep.view_as(t))
    w = [st["w"].sqrt() * m for (_, st), m in zip(raw, masks)]
    den = sum(w)
    expected = b["w"] + torch.where(den > 0, sum(x * t for x, t in zip(w, tau)) / den.clamp(min=1e-30), 0.0)
    torch.testing.assert_close(got["w"], expected, rtol=1e-5, atol=1e-6)
    nowhere = ~(masks[0] | masks[1] | masks[2])
    assert nowhere.any() and torch.equal(got["w"][nowhere], b["w"][nowhere])  # every expert masked: θ₀
    # one unmasked expert returns that expert
    one = merge(experts, base=base, strategy=OTA(threshold=[0.0, 1e30, 1e30]))
    torch.testing.assert_close(one["w"], raw[0][0]["w"])
    # scaling every v by one constant changes nothing (eps 0, density mode)
    scaled = [Expert(sd, statistics={"exp_avg_sq": {k: 7.0 * v for k, v in st.items()}}) for sd, st in raw]
    again = merge(scaled, base=base, strategy=OTA(density=0.25, eps=0.0))
    torch.testing.assert_close(again["w"], got["w"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        OTA(density=0.2, threshold=1.0)
    with pytest.raises(ValueError, match="needs a base"):
        merge(experts, strategy=OTA(density=0.2))


def experts_with_steps(steps, beta2=0.999, shape=(6, 8), seed=0):
    """Experts whose ``exp_avg_sq`` carries the β₂ and step of a capture (``steps[i]`` for expert i), with the raw
    tensors; and the base."""
    base = {"w": rand(*shape, seed=seed), "b": rand(shape[0], seed=seed + 1)}
    experts, raw = [], []
    for i, step in enumerate(steps):
        sd = {k: v + 0.1 * rand(*v.shape, seed=seed + 10 + 2 * i + j) for j, (k, v) in enumerate(base.items())}
        v = {k: 1e-3 * rand(*t.shape, seed=seed + 100 + 2 * i + j).abs() + 1e-6
             for j, (k, t) in enumerate(base.items())}
        stats = Statistics.from_mapping({"tensors": {f"exp_avg_sq/{k}": t for k, t in v.items()},
                                         "kinds": {"exp_avg_sq": {"beta2": beta2, "step": step}}})
        experts.append(Expert(sd, statistics=stats, name=f"e{i}"))
        raw.append((sd, v))
    return base, experts, raw


def test_ota_raw_second_moments_are_the_reference_weights_and_differ_only_with_unequal_steps():
    base, experts, raw = experts_with_steps([50, 400, 3000])
    for power, eps in ((0.5, 1e-8), (1.0, 0.0)):
        got = merge(experts, base=base, strategy=OTA(bias_correct=False, power=power, eps=eps, scale=1.5))
        for k in ("w", "b"):  # Σ(vᵢᵖ + ε)τᵢ / Σ(vᵢᵖ + ε) with the raw exp_avg_sq, as the reference weighs
            w = [v[k] ** power + eps for _, v in raw]
            tau = [sd[k] - base[k] for sd, _ in raw]
            torch.testing.assert_close(got[k], base[k] + 1.5 * sum(a * t for a, t in zip(w, tau)) / sum(w),
                                       rtol=1e-5, atol=1e-6)
    corrected = merge(experts, base=base, strategy=OTA(bias_correct=True))
    by_hand = [{k: t / (1 - 0.999**step) for k, t in v.items()} for (_, v), step in zip(raw, (50, 400, 3000))]
    w = [v["w"].sqrt() + 1e-8 for v in by_hand]
    torch.testing.assert_close(corrected["w"], base["w"] + sum(a * (sd["w"] - base["w"]) for a, (sd, _) in
                                                              zip(w, raw)) / sum(w), rtol=1e-5, atol=1e-6)
    plain = merge(experts, base=base, strategy=OTA(bias_correct=False))
    tau_c, tau_r = corrected["w"] - base["w"], plain["w"] - base["w"]
    assert float((tau_c - tau_r).norm() / tau_c.norm()) > 0.2  # 50 / 400 / 3000 steps: the forms weigh apart
    # the same number of steps: one factor for every expert, so the two forms agree up to eps
    _, same, _ = experts_with_steps([400, 400, 400])
    a = merge(same, base=base, strategy=OTA(bias_correct=True))
    b = merge(same, base=base, strategy=OTA(bias_correct=False))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_ota_ffg_threshold_is_compared_with_the_saliency_of_its_mode():
    base, experts, raw = experts_with_steps([50, 400, 3000])
    tau = [sd["w"] - base["w"] for sd, _ in raw]
    sal = [v["w"] * t**2 for (_, v), t in zip(raw, tau)]  # raw v ⊙ τ², the paper's saliency
    kappa = float(torch.cat([s.reshape(-1) for s in sal]).median())
    for bias_correct in (False, True):
        got = merge(experts, base=base, strategy=OTA(threshold=kappa, eps=0.0, bias_correct=bias_correct))
        factor = [1 / (1 - 0.999**t) if bias_correct else 1.0 for t in (50, 400, 3000)]
        keep = [f * s >= kappa for f, s in zip(factor, sal)]
        w = [(f * v["w"]).sqrt() * m for f, (_, v), m in zip(factor, raw, keep)]
        den = sum(w)
        num = sum(x * t for x, t in zip(w, tau))
        expected = base["w"] + torch.where(den > 0, num / den.clamp(min=1e-30), 0.0)
        torch.testing.assert_close(got["w"], expected, rtol=1e-5, atol=1e-6)
    # density masks are the same in both modes (one correction factor per tensor), the weights are not
    a = merge(experts, base=base, strategy=OTA(density=0.3, bias_correct=True))
    b = merge(experts, base=base, strategy=OTA(density=0.3, bias_correct=False))
    assert torch.equal(a["w"] == base["w"], b["w"] == base["w"]) and not torch.allclose(a["w"], b["w"])


def test_ota_raw_reads_the_stored_moments_through_a_sidecar_a_continual_state_and_the_registry(tmp_path):
    base, experts, raw = experts_with_steps([50, 400, 3000])
    strategy = OTA(bias_correct=False, scale=1.2)
    assert Strategy.from_dict(strategy.to_dict()) == strategy and strategy.requires == ("exp_avg_sq.raw",)
    assert OTA() == OTA(bias_correct=False) and OTA(bias_correct=True).requires == ("exp_avg_sq",)
    paths = []
    for i, (expert, (sd, v)) in enumerate(zip(experts, raw)):
        save_tensors(tmp_path / f"e{i}.safetensors", sd)
        write_statistics(tmp_path / f"e{i}.statistics.safetensors", {"exp_avg_sq": v},
                         {"exp_avg_sq": {"beta2": 0.999, "step": expert.metadata["exp_avg_sq"]["step"]}})
        paths.append(tmp_path / f"e{i}.safetensors")
        loaded = Expert(paths[-1])
        torch.testing.assert_close(loaded.statistic("w", "exp_avg_sq.raw"), v["w"])
    save_tensors(tmp_path / "base.safetensors", base)
    want = merge(experts, base=base, strategy=strategy)
    got = merge(paths, base=tmp_path / "base.safetensors", strategy=strategy)
    state = ContinualState.create(tmp_path / "state", base=tmp_path / "base.safetensors", strategy=strategy)
    for p in paths:
        state.add(p)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.state_dict()[k], want[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="OTA.bias_correct must be True or False"):
        OTA(bias_correct="no")


# -- WeightedMedian -------------------------------------------------------------------------------------------------
def test_weighted_median_properties():
    ones = torch.ones(3, 1)
    # equal weights, κ = 1, no conflicts: the lower median (importance none)
    tau = torch.tensor([[1.0], [3.0], [2.0]])
    assert weighted_median(tau, ones, torch.ones(3), 1.0, "none").item() == 2.0
    tau4 = torch.tensor([[1.0], [4.0], [2.0], [3.0]])
    assert weighted_median(tau4, torch.ones(4, 1), torch.ones(4), 1.0, "none").item() == 2.0  # lower of 2, 3
    # the tie rule is symmetric in sign: two equal halves give the smaller magnitude, and negating τ negates τ*
    assert weighted_median(-tau4, torch.ones(4, 1), torch.ones(4), 1.0, "none").item() == -2.0
    t = torch.randint(-3, 4, (4, 500)).float()  # many exact ties
    t[:, t.sum(0) == 0] += 1  # the election's "+ at 0" is the one asymmetric choice
    for importance in ("none", "magnitude"):
        for kappa in (1.0, 0.5):
            torch.testing.assert_close(weighted_median(-t, torch.ones(4, 500), torch.ones(4), kappa, importance),
                                       -weighted_median(t, torch.ones(4, 500), torch.ones(4), kappa, importance))
    # an expert holding more than half of the weight wins
    fisher = torch.tensor([[1.0], [10.0], [1.0]])
    assert weighted_median(tau, fisher, torch.ones(3), 1.0, "none").item() == 3.0
    # sign election drops the minority sign
    conflict = torch.tensor([[1.0], [2.0], [-0.5]])
    assert weighted_median(conflict, ones, torch.ones(3), 1.0, "none").item() == 1.0
    # κ keeps the top ⌈κ|A|⌉ agreeing experts by |τ|: here the two largest of three
    assert weighted_median(tau, ones, torch.ones(3), 0.5, "none").item() == 2.0
    assert weighted_median(tau, ones, torch.ones(3), 0.3, "none").item() == 3.0
    # zero total weight gives 0
    assert weighted_median(tau, torch.zeros(3, 1), torch.ones(3), 1.0, "none").item() == 0.0
    # rescaling all weights of a coordinate changes nothing; the output is always an input or 0
    t = rand(5, 200, seed=3)
    f = rand(5, 200, seed=4).abs()
    a = weighted_median(t, f, torch.ones(5), 0.6, "magnitude")
    b = weighted_median(t, f * torch.rand(1, 200) * 100, torch.ones(5), 0.6, "magnitude")
    assert torch.equal(a, b)
    assert bool(((a.unsqueeze(0) == t).any(0) | (a == 0)).all())


def test_weighted_median_normalize_makes_one_experts_fisher_scale_irrelevant():
    """normalize divides λᵢ by ‖Fᵢ‖ over the model: multiplying one expert's Fisher by 1000 changes nothing; without
    it that expert wins more medians."""
    base, experts, raw = experts_with("fisher", n=4)
    scaled = [Expert(sd, statistics={"fisher": {k: v * (1000.0 if i == 1 else 1.0) for k, v in st.items()}})
              for i, (sd, st) in enumerate(raw)]
    for kappa in (1.0, 0.5):
        strategy = WeightedMedian(normalize=True, kappa=kappa)
        a, b = merge(experts, base=base, strategy=strategy), merge(scaled, base=base, strategy=strategy)
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    plain_a = merge(experts, base=base, strategy=WeightedMedian())
    plain_b = merge(scaled, base=base, strategy=WeightedMedian())
    assert any(not torch.equal(plain_a[k], plain_b[k]) for k in plain_a)
    # by hand: the weights are 1/‖Fᵢ‖ with the norm over both tensors
    norms = [torch.sqrt(sum((st[k].double() ** 2).sum() for k in st)).item() for _, st in raw]
    b_w = base.tensor("w").reshape(-1)
    tau = torch.stack([sd["w"].reshape(-1) - b_w for sd, _ in raw])
    fisher = torch.stack([st["w"].reshape(-1) for _, st in raw])
    want = weighted_median(tau, fisher, torch.tensor([1 / n for n in norms]), 1.0, "magnitude")
    got = merge(experts, base=base, strategy=WeightedMedian(normalize=True))["w"].reshape(-1) - b_w
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        WeightedMedian(normalize=1)


def test_weighted_median_matches_a_plain_loop_reference():
    n, m = 5, 300
    tau, fisher = rand(n, m, seed=7), rand(n, m, seed=8).abs()
    kappa = 0.7
    got = weighted_median(tau, fisher, torch.ones(n), kappa, "magnitude")
    for j in range(m):
        col = tau[:, j]
        gamma = 1.0 if col.sum() >= 0 else -1.0
        agree = [i for i in range(n) if torch.sign(col[i]) == gamma]
        agree.sort(key=lambda i: -abs(col[i].item()))
        kept = agree[: int(torch.ceil(torch.tensor(kappa * len(agree) - 1e-9)))]
        pairs = sorted(((col[i].item(), (fisher[i, j] * col[i].abs()).item()) for i in kept), key=lambda p: abs(p[0]))
        total = sum(w for _, w in pairs)
        acc, value = 0.0, 0.0
        for v, w in pairs:
            acc += w
            if 2 * acc >= total and total > 0:
                value = v
                break
        assert got[j].item() == pytest.approx(value)


def test_weighted_median_through_merge_and_serialisation():
    base, experts, raw = experts_with("fisher")
    got = merge(experts, base=base, strategy=WeightedMedian(scale=0.5))
    b = base.tensor("w").reshape(-1)
    tau = torch.stack([sd["w"].reshape(-1) - b for sd, _ in raw])
    fis = torch.stack([st["w"].reshape(-1) for _, st in raw])
    expected = b + 0.5 * weighted_median(tau, fis, torch.ones(3), 1.0, "magnitude")
    torch.testing.assert_close(got["w"].reshape(-1), expected)
    for strategy in (Fisher(weights=[1, 2, 3]), OTA(density=0.3), WeightedMedian(kappa=0.5, importance="none")):
        assert Strategy.from_dict(strategy.to_dict()) == strategy


def test_fisher_norms_stream_in_row_chunks_and_are_exact_sums_of_the_rows(monkeypatch):
    """The first pass of normalize reads each statistic in row chunks (never a large tensor whole) and adds the rows'
    float64 sums of squares exactly: the norm, hence the merge, is the same bit for bit however it is chunked, and
    equals sqrt(fsum of the rows' sums) (issue 32)."""
    import math

    from lightning_merge.strategies import norms

    base, experts, raw = experts_with("fisher", shape=(64, 48))
    whole = merge(experts, base=base, strategy=Fisher(weights=[1.0, 2.0, 0.5]))
    reads: list = []
    original = norms.row_chunks

    def tiny_chunks(shape):
        chunks = original(shape) if len(tuple(shape)) < 2 else \
            [(s, min(s + 5, shape[0])) for s in range(0, shape[0], 5)]
        reads.append(chunks)
        return chunks

    monkeypatch.setattr(norms, "row_chunks", tiny_chunks)
    chunked = merge(experts, base=base, strategy=Fisher(weights=[1.0, 2.0, 0.5]))
    assert any(len(c) == 13 for c in reads)  # the (64, 48) statistic was read 5 rows at a time
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    fisher = Fisher(weights=[1.0, 2.0, 0.5])
    got = norms.model_norms(_plan(experts, base, fisher), "fisher", fisher._precision)
    for (_, st), norm in zip(raw, got):
        rows = [float(r) for k in sorted(st) for r in
                st[k].clamp(min=fisher.floor).double().square().reshape(st[k].shape[0] if st[k].dim() > 1 else 1,
                                                                           -1).sum(1)]
        assert norm == math.sqrt(math.fsum(rows))


def _plan(experts, base, strategy):
    from lightning_merge.engine.plan import plan_merge

    return plan_merge(experts, base, strategy)
