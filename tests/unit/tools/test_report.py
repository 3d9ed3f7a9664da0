"""The diagnostics report: its numbers against an independent computation on a tiny model, a self-contained HTML
folder (every image it references exists and is a PNG), the command line, and the Trainer's loggers."""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("matplotlib")

from capture_helpers import Tiny, loader, trainer  # noqa: E402

from lightning_merge import OPCM, Expert, Fisher, Linear, Ties, WeightedMedian, merge, report  # noqa: E402
from lightning_merge.cli.commands import main  # noqa: E402
from lightning_merge.files.safetensors import save_tensors  # noqa: E402
from lightning_merge.strategies import functional as F  # noqa: E402


def _family(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0.weight": (12, 10), "layers.0.bias": (12,), "layers.1.weight": (8, 12), "head.weight": (4, 8)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_tensors(tmp_path / "base.safetensors", base)
    paths, taus = [], []
    for i in range(n):
        tau = {k: 0.3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.7)
               for k, v in base.items()}
        save_tensors(tmp_path / f"e{i}.safetensors", {k: base[k] + tau[k] for k in base})
        paths.append(tmp_path / f"e{i}.safetensors")
        taus.append(tau)
    return tmp_path / "base.safetensors", paths, base, taus


def test_the_numbers_match_an_independent_computation(tmp_path):
    base_path, paths, base, taus = _family(tmp_path)
    data = report(paths, base_path, Ties(density=0.4)).data
    names = list(base)
    flat = torch.stack([torch.cat([(t[k] + base[k] - base[k]).reshape(-1) for k in names]) for t in taus]).double()
    cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    torch.testing.assert_close(torch.tensor(data["cosine"], dtype=torch.float64), cos, rtol=1e-5, atol=1e-6)
    for k in names:
        entry = data["tensors"][k]
        stacked = torch.stack([(base[k] + t[k]) - base[k] for t in taus]).reshape(3, -1)
        assert entry["norm"] == pytest.approx([float(v) for v in stacked.double().norm(dim=1)], rel=1e-5)
        conflicts = sum(1 for col in stacked.T if (col > 0).any() and (col < 0).any()) / stacked.shape[1]
        assert entry["sign_conflict"] == pytest.approx(conflicts)
        masks = [F.magnitude_mask(row, 0.4) & (row != 0) for row in stacked]
        for i, m in enumerate(masks):
            others = torch.stack([masks[j] for j in range(3) if j != i]).any(0)
            assert entry["kept"]["density"][i] == pytest.approx(float(m.double().mean()))
            assert entry["kept"]["overlap"][i] == pytest.approx(float((m & others).sum() / m.sum()))
        merged = merge(paths, base_path, Ties(density=0.4))[k] - Expert(base_path).tensor(k)
        assert entry["merged_norm"] == pytest.approx(float(merged.double().norm()), rel=1e-5)
    block0 = data["blocks"]["0"]  # layers.0.weight and layers.0.bias
    assert block0["numel"] == 12 * 10 + 12
    expect = [math.sqrt(data["tensors"]["layers.0.weight"]["norm"][i] ** 2 + data["tensors"]["layers.0.bias"][
        "norm"][i] ** 2) for i in range(3)]
    assert block0["norm"] == pytest.approx(expect)
    assert "other" in data["blocks"]  # head.weight has no layer index


def test_median_winners_opcm_shares_and_statistic_masses(tmp_path):
    from lightning_merge.formats.sidecar import write_statistics

    base_path, paths, base, _ = _family(tmp_path)
    for i in range(len(paths)):
        write_statistics(tmp_path / f"e{i}.statistics.safetensors",
                         {"fisher.example": {k: torch.full(v.shape, float(i + 1)) for k, v in base.items()}},
                         {"fisher.example": {"count": 1}})
    median = report(paths, base_path, WeightedMedian(importance="none")).data
    for entry in median["tensors"].values():
        assert 0.99 <= sum(entry["winners"]) <= 1.0 + 1e-9 or sum(entry["winners"]) == 0
        assert entry["statistic_mass"]["fisher"] == pytest.approx([(i + 1) * entry["numel"] for i in range(3)])
    opcm = report(paths, base_path, OPCM()).data
    for name, entry in opcm["tensors"].items():
        assert entry["projected_share"][0] == 0.0  # the first expert is kept whole
        if name.endswith(".weight") and entry["numel"] > 40:
            assert 0 < entry["projected_share"][1] < 1
    plain = report(paths, base_path).data
    assert plain["strategy"] is None and "merged_norm" not in plain["tensors"]["layers.0.weight"]


def test_what_fisher_and_ota_keep_of_each_expert(tmp_path):
    """weight_share: each expert's mean share of the precision weighting, per tensor and per block (size-weighted),
    equal to the hand computation; drawn as its own figure."""
    from lightning_merge import OTA
    from lightning_merge.formats.sidecar import write_statistics

    base_path, paths, base, _ = _family(tmp_path)
    g = torch.Generator().manual_seed(1)
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()} for _ in paths]
    for i, fisher in enumerate(fishers):
        write_statistics(tmp_path / f"e{i}.statistics.safetensors",
                         {"fisher.example": fisher, "exp_avg_sq": fisher},
                         {"fisher.example": {"count": 1}, "exp_avg_sq": {"beta2": 0.999, "step": 1000}},
                         compression="float32")
    got = report(paths, base_path, Fisher(floor=0.0, normalize=False)).data
    for name, entry in got["tensors"].items():
        total = sum(f[name].double() for f in fishers)
        expect = [float((f[name].double() / total).mean()) for f in fishers]
        assert entry["weight_share"] == pytest.approx(expect, rel=1e-6)
        assert sum(entry["weight_share"]) == pytest.approx(1.0)
    normalized = report(paths, base_path, Fisher(floor=0.0)).data  # λᵢ = 1/‖Fᵢ‖ over the whole model
    norms = [math.sqrt(sum(float(v.double().square().sum()) for v in f.values())) for f in fishers]
    for name, entry in normalized["tensors"].items():
        total = sum(f[name].double() / m for f, m in zip(fishers, norms))
        expect = [float((f[name].double() / m / total).mean()) for f, m in zip(fishers, norms)]
        assert entry["weight_share"] == pytest.approx(expect, rel=1e-6)
    block0 = got["blocks"]["0"]
    w, b = got["tensors"]["layers.0.weight"], got["tensors"]["layers.0.bias"]
    assert block0["weight_share"] == pytest.approx(
        [(w["weight_share"][i] * 120 + b["weight_share"][i] * 12) / 132 for i in range(3)])
    ota = report(paths, base_path, OTA()).data
    assert all(sum(e["weight_share"]) == pytest.approx(1.0) for e in ota["tensors"].values())
    pytest.importorskip("matplotlib")
    assert "weight_share" in report(paths, base_path, Fisher()).figures()


def test_figures_tell_the_experts_apart_and_scale_to_the_values_present(tmp_path):
    from lightning_merge.tools.diagnostics import _heatmap, _pyplot, expert_labels, strategy_text

    assert expert_labels(["runs/up/final.adapter", "runs/down/final.adapter"]) == ["up", "down"]
    assert expert_labels(["s3://b/runs/up/final.adapter/", "s3://b/runs/down/final.adapter/"]) == ["up", "down"]
    assert expert_labels(["a/e.safetensors", "b/e.safetensors", "b/e.safetensors"]) == ["a", "b#1", "b#2"]
    assert expert_labels(["runs/up/final.adapter"]) == ["final.adapter"]
    assert expert_labels(["x/m1.safetensors", "x/m2.safetensors"]) == ["m1.safetensors", "m2.safetensors"]
    assert strategy_text(Fisher(scale=0.5).to_dict()).startswith("fisher(") and "{" not in strategy_text(
        Fisher(scale=0.5).to_dict())
    pytest.importorskip("matplotlib")
    figure = _heatmap(_pyplot(), [[0.0, 1e3], [10.0, 0.0]], ["0", "1"], ["up", "down"], "mass", "sum", log=True)
    image = figure.axes[0].images[0]
    assert image.get_clim() == pytest.approx((1.0, 3.0))  # log10 of the values present, not of 1e-30
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["up", "down"]


def test_any_strategy_reports_through_its_diagnose_hook(tmp_path):
    """report() asks the strategy (Strategy.diagnose) instead of knowing its classes: a strategy the report has never
    heard of gets the merged norm by default and shows whatever its own hook adds."""
    import dataclasses

    from lightning_merge.strategies import Strategy

    @dataclasses.dataclass(frozen=True)
    class Halfway(Strategy):  # θ₀ + ½ Σ τᵢ, and the share of ‖τ*‖ each expert's τ makes up
        def merge_tensor(self, name, base, tensors, stats, prepared=None):
            return base + 0.5 * sum(t - base for t in tensors)

    @dataclasses.dataclass(frozen=True)
    class Explained(Halfway):
        def diagnose(self, plan, name, taus, merged):
            out = super().diagnose(plan, name, taus, merged)
            out["share"] = [float(t.double().norm() / max(merged.double().norm(), 1e-30)) for t in taus]
            out["experts_prepared"] = plan.prepared.num_experts
            return out

    base_path, paths, base, taus = _family(tmp_path)
    plain = report(paths, base_path, Halfway()).data["tensors"]
    explained = report(paths, base_path, Explained()).data["tensors"]
    for k in base:
        merged = 0.5 * sum(t[k] for t in taus)
        assert plain[k]["merged_norm"] == pytest.approx(float(merged.double().norm()), rel=1e-5)
        assert "share" not in plain[k] and explained[k]["merged_norm"] == plain[k]["merged_norm"]
        assert explained[k]["share"] == pytest.approx([float(t[k].double().norm() / merged.double().norm())
                                                       for t in taus], rel=1e-5)
        assert explained[k]["experts_prepared"] == 3


def test_the_folder_is_self_contained(tmp_path):
    from PIL import Image

    base_path, paths, _, _ = _family(tmp_path)
    out = report(paths, base_path, Fisher(), on_missing_statistic="uniform").save(tmp_path / "rep")
    page = (out / "index.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and "report.json" in sources
    assert not [s for s in sources if "://" in s or s.startswith("/")]  # nothing from the network
    for src in sources:
        assert (out / src).is_file(), src
        if src.endswith(".png"):
            with Image.open(out / src) as image:
                assert image.format == "PNG" and image.size[0] > 50
    assert "<script" not in page


def test_the_command_line_writes_a_report(tmp_path, capsys):
    base_path, paths, _, _ = _family(tmp_path)
    code = main(["report", *map(str, paths), "--base", str(base_path), "--out", str(tmp_path / "r"),
                 "--strategy", "ties", "--set", "density=0.3", "--no-progress"])
    assert code == 0
    assert "mean pairwise cosine" in capsys.readouterr().out
    assert (tmp_path / "r" / "kept.png").exists() and (tmp_path / "r" / "report.json").exists()


def test_the_command_line_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    """Issue 30 #6: a bare ModuleNotFoundError after reading the experts; now one line at once, and no output."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    base_path, paths, _, _ = _family(tmp_path)
    code = main(["report", *map(str, paths), "--base", str(base_path), "--out", str(tmp_path / "r"), "--no-progress"])
    assert code != 0
    assert "pip install 'lightning-merge[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_plots_of_sweeps_and_merge_reports(tmp_path):
    from lightning_merge.tools.evaluation import MergeReport, sweep_scale

    base_path, paths, _, _ = _family(tmp_path)
    result = sweep_scale(Ties(density=0.5), paths, base_path, score=lambda s: -abs(float(
        s["layers.0.weight"].mean())), scales=(0.5, 1.0))
    assert result.plot().axes
    merge_report = MergeReport({"a": 0.9, "b": 0.8})
    merge_report.add("ties", {"a": 0.85, "b": 0.7}, scale=1.0)
    assert merge_report.plot().axes
    data = report(paths, base_path, sweeps={"ties": result}, merge_report=merge_report,
                  continual=[{"count": 1, "scores": {"a": 0.9}}, {"count": 2, "scores": {"a": 0.8, "b": 0.7}}])
    assert {"sweeps", "continual"} <= set(data.figures())


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_merge_callbacks_log_numbers_and_figures(tmp_path, kind):
    pytest.importorskip("tensorboardX" if kind == "tensorboard" else "csv")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_merge.callbacks import CheckpointAveraging, ContinualMerge, MergeOnFitEnd

    save_tensors(tmp_path / "other.safetensors", Tiny(seed=1).state_dict())
    save_tensors(tmp_path / "base.safetensors", Tiny(seed=0).state_dict())
    logger = (CSVLogger(tmp_path / "logs", name="run") if kind == "csv" else
              TensorBoardLogger(tmp_path / "logs", name="run"))
    callbacks = [
        ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2),
        CheckpointAveraging(select="top_k", k=2, weighting="mwa"),
        MergeOnFitEnd(experts=[str(tmp_path / "other.safetensors")], strategy=Linear(),
                      out=str(tmp_path / "merged.safetensors")),
        ContinualMerge(state=str(tmp_path / "state"), base=str(tmp_path / "base.safetensors"), strategy=Linear()),
    ]
    trainer(tmp_path, callbacks, max_epochs=3, logger=logger).fit(Tiny(seed=0, lr=5e-2), loader(),
                                                                   loader(16, 8, seed=1))
    if kind == "csv":
        import csv

        rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
        columns = set(rows[0])
        assert {"merge/mean_cosine", "merge/sign_conflict", "averaging/weight/0", "continual/count"} <= columns
        values = [float(r["merge/mean_cosine"]) for r in rows if r.get("merge/mean_cosine")]
        assert values and -1 <= values[0] <= 1
        pngs = {p.parent.name + "/" + p.name.split("-step")[0] for p in
                __import__("pathlib").Path(logger.log_dir).rglob("*.png")}
        assert {"merge/cosine", "merge/norms", "averaging/weights", "continual/norms"} <= pngs
    else:
        events = b"".join(p.read_bytes() for p in __import__("pathlib").Path(logger.log_dir).glob("events.*"))
        for tag in (b"merge/cosine", b"merge/mean_cosine", b"averaging/weights", b"continual/norms"):
            assert tag in events, tag
