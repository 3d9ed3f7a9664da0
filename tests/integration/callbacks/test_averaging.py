"""Checkpoint averaging: MWA formula, selection, the callback's average equals one computed by hand from the
files, resume from the average, curvature weighting, WeightAveraging checkpoints, the CLI, DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from capture_helpers import SaveRankWeights, Tiny, ddp_loader, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_merge import Expert, Fisher, merge
from lightning_merge.callbacks import CheckpointAveraging, CurvatureCapture
from lightning_merge.tools.averaging import CheckpointInfo, mwa_weights, read_info, select_checkpoints


def test_mwa_weights_formula():
    w = mwa_weights([0.5, 1.0, 2.0], p=1.0, mode="min")
    raw = [2.0, 1.0, 0.5]
    assert w == pytest.approx([r / 3.5 for r in raw])
    assert mwa_weights([0.5, 1.0, 2.0], p=2.0, mode="max") == pytest.approx([0.25 / 5.25, 1 / 5.25, 4 / 5.25])
    assert mwa_weights([3.0, 7.0], p=0.0, mode="min") == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="checkpoint 'b.ckpt' has metric -1.0.*weigh by step"):
        mwa_weights([1.0, -1.0], p=1.0, mode="min", names=["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="metric nan"):
        mwa_weights([float("nan")], p=1.0, mode="min")


def test_selection():
    infos = [
        CheckpointInfo(Path(f"{s}.ckpt"), s, s // 10, score, "val_loss")
        for s, score in ((10, 0.5), (20, 0.3), (30, 0.4), (40, 0.2))
    ]
    names = lambda chosen: [i.path.name for i in chosen]  # noqa: E731
    assert names(select_checkpoints(infos, select="top_k", k=2, mode="min")) == ["20.ckpt", "40.ckpt"]
    assert names(select_checkpoints(infos, select="top_k", k=2, mode="max")) == ["10.ckpt", "30.ckpt"]
    assert names(select_checkpoints(infos, select="last", k=3)) == ["20.ckpt", "30.ckpt", "40.ckpt"]
    assert names(select_checkpoints(infos, select="window", window=(15, 30))) == ["20.ckpt", "30.ckpt"]
    assert names(select_checkpoints(infos, select="window", window=(2, 3), window_unit="epoch")) == [
        "20.ckpt",
        "30.ckpt",
    ]
    with pytest.raises(ValueError, match="no checkpoint matches"):
        select_checkpoints(infos, select="window", window=(100, 200))


def run_with_checkpoints(tmp_path, averaging, epochs=4, extra=()):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=3, save_last=True)
    model = Tiny(lr=5e-2)
    tr = trainer(tmp_path, [*extra, ckpt, averaging], max_epochs=epochs)
    tr.fit(model, loader(), loader(16, 8, seed=1))
    return tr, model, ckpt


def test_callback_mwa_top_k_equals_the_hand_average_and_resumes(tmp_path):
    averaging = CheckpointAveraging(select="top_k", k=3, weighting="mwa", p=2.0)
    tr, model, ckpt = run_with_checkpoints(tmp_path, averaging)
    paths = sorted(ckpt.best_k_models)
    assert sorted(p for p, _ in averaging.averaged) == paths
    scores = {p: float(s) for p, s in ckpt.best_k_models.items()}
    raw = {p: scores[p] ** -2.0 for p in paths}
    total = sum(raw.values())
    out = tmp_path / "ckpt" / "averaged.ckpt"
    saved = torch.load(out, weights_only=True)
    for name in ("net.0.weight", "net.2.bias"):
        expected = sum(raw[p] / total * torch.load(p, weights_only=True)["state_dict"][name] for p in paths)
        torch.testing.assert_close(saved["state_dict"][name], expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-6, atol=1e-7)  # loaded
    assert saved["lightning_merge"]["weighting"] == "mwa"
    assert sum(saved["lightning_merge"]["weights"]) == pytest.approx(1.0)
    # it resumes like any checkpoint: optimizer and loops of the newest averaged checkpoint are kept
    newest = max(paths, key=lambda p: read_info(p).global_step)
    assert saved["global_step"] == torch.load(newest, weights_only=True)["global_step"]
    assert "optimizer_states" in saved and "loops" in saved
    resumed = trainer(tmp_path / "resume", [], max_epochs=5)
    resumed.fit(Tiny(lr=5e-2), loader(), ckpt_path=str(out))
    assert resumed.global_step == 20


def test_fisher_weighting_reads_the_capture_sidecars(tmp_path):
    averaging = CheckpointAveraging(select="last", k=2, weighting="fisher")
    tr, model, ckpt = run_with_checkpoints(tmp_path, averaging, extra=[CurvatureCapture()])
    paths = [p for p, _ in averaging.averaged]
    assert len(paths) == 2 and all(w is None for _, w in averaging.averaged)
    by_hand = merge([Expert(p) for p in paths], strategy=Fisher(normalize=False))
    for name, value in by_hand.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_weight_averaging_checkpoints_average_the_raw_weights_on_request(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    averaging = CheckpointAveraging(select="all", source="current_model_state", load_averaged=False)
    trainer(tmp_path, [EMAWeightAveraging(decay=0.9), ckpt, averaging], max_epochs=2).fit(Tiny(lr=5e-2), loader())
    files = sorted((tmp_path / "ckpt").glob("epoch*.ckpt"))
    raw = [torch.load(f, weights_only=True)["current_model_state"]["net.0.weight"] for f in files]
    saved = torch.load(tmp_path / "ckpt" / "averaged.ckpt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["net.0.weight"], sum(raw) / len(raw))
    ema = [torch.load(f, weights_only=True)["state_dict"]["net.0.weight"] for f in files]
    assert not torch.allclose(sum(ema) / len(ema), sum(raw) / len(raw))  # the default would average the EMA


def test_cli_average(tmp_path):
    from lightning_merge.cli.commands import main

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [ckpt], max_epochs=3).fit(Tiny(lr=5e-2), loader())
    files = [str(f) for f in sorted((tmp_path / "ckpt").glob("*.ckpt"))]
    out = tmp_path / "avg.ckpt"
    assert main(["average", *files, "--out", str(out), "--weighting", "mwa", "--mwa-by", "step", "--p", "1"]) == 0
    steps = [torch.load(f, weights_only=True)["global_step"] for f in files]
    expected = sum(
        s / sum(steps) * torch.load(f, weights_only=True)["state_dict"]["net.0.bias"] for s, f in zip(steps, files)
    )
    torch.testing.assert_close(torch.load(out, weights_only=True)["state_dict"]["net.0.bias"], expected)
    assert main(["average", *files, "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert main(["average", *files, "--out", str(out), "--weighting", "mwa", "--overwrite"]) == 2  # no metric


@pytest.mark.slow
def test_ddp_every_rank_ends_with_the_average(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(
        tmp_path,
        [ckpt, CheckpointAveraging(select="all"), SaveRankWeights(str(tmp_path))],
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    ).fit(Tiny(lr=5e-2), ddp_loader(32, 4))
    avg = Expert(tmp_path / "ckpt" / "averaged.ckpt")
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in avg.names():
            assert torch.equal(state[name], avg.tensor(name))
