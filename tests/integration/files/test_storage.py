"""Object storage: experts, sidecars and outputs on s3:// URLs, against a real S3-compatible server (moto's server
mode, started by the suite; see conftest.s3), not a mock of the client."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_base, write_family

from lightning_merge import Expert, Fisher, Ties, merge
from lightning_merge.files.remote import exists, fetch, filesystem, is_url, upload
from lightning_merge.files.safetensors import load_tensors, save_tensors
from lightning_merge.formats.sidecar import Statistics, find_sidecar, sidecar_path, write_statistics

pytest.importorskip("s3fs")

SHAPES = {"a.weight": (8, 6), "a.bias": (8,), "b.weight": (3, 8)}
KINDS = {"fisher.example": {"count": 4}}


def _world(root: Path, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_tensors(root / "base.safetensors", base)
    paths = []
    for i in range(n):
        path = root / f"e{i}.safetensors"
        save_tensors(path, {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        stats = {"fisher.example": {k: torch.rand(s, generator=g) + 0.1 for k, s in SHAPES.items()}}
        write_statistics(sidecar_path(path), stats, KINDS)
        paths.append(path)
    return root / "base.safetensors", paths


def _put(local: Path, url: str) -> str:
    fs, path = filesystem(url)
    if local.is_dir():
        fs.put(str(local), path, recursive=True)
    else:
        fs.put_file(str(local), path)
    return url


def test_urls_are_recognised():
    assert is_url("s3://bucket/x.ckpt") and is_url("gs://b/f") and is_url("az://c/d/")
    assert not is_url("runs/x.ckpt") and not is_url("/abs/x") and not is_url("file:///tmp/x")
    assert not is_url(Path("s3:/bucket/x"))
    assert sidecar_path("s3://b/run/last.ckpt") == "s3://b/run/last.statistics.safetensors"
    assert sidecar_path("s3://b/run/model/") == "s3://b/run/model/statistics.safetensors"


def test_a_fisher_merge_of_remote_experts_to_a_remote_folder_equals_the_local_merge(s3, tmp_path):
    base, experts = _world(tmp_path / "local")
    for p in [base, *experts]:
        _put(p, f"{s3}/experts/{p.name}")
        if find_sidecar(p):
            _put(find_sidecar(p), f"{s3}/experts/{Path(find_sidecar(p)).name}")
    strategy = Fisher()
    want = merge(experts, base, strategy)
    urls = [f"{s3}/experts/e{i}.safetensors" for i in range(3)]
    # the sidecars come with the experts: a Fisher merge needs them
    assert Expert(urls[0]).has_statistic("fisher")
    out = merge(urls, f"{s3}/experts/base.safetensors", strategy, f"{s3}/merged")
    assert out == f"{s3}/merged"
    local = fetch(out)
    got = load_tensors(local / "model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    provenance = json.loads((local / "lightning_merge.json").read_text())
    assert provenance["experts"] == urls  # names stay the URLs the user gave

    # a single-file output, and refusing to replace it without overwrite
    single = merge(urls, f"{s3}/experts/base.safetensors", Ties(density=0.5), f"{s3}/ties.safetensors")
    want_ties = merge(experts, base, Ties(density=0.5))
    got_ties = load_tensors(fetch(single))
    assert all(torch.equal(got_ties[k], want_ties[k]) for k in want_ties)
    with pytest.raises(FileExistsError, match="ties.safetensors' already exists; pass overwrite=True"):
        merge(urls, f"{s3}/experts/base.safetensors", Ties(density=0.5), single)
    with pytest.raises(FileExistsError, match="already exists"):
        merge(urls, f"{s3}/experts/base.safetensors", Ties(), single, dry_run=True)


def test_fetch_downloads_once_and_again_only_when_the_object_changes(s3, tmp_path, monkeypatch):
    _, experts = _world(tmp_path / "local", n=1)
    url = _put(experts[0], f"{s3}/e.safetensors")
    import lightning_merge.files.remote as storage

    calls = []
    real = storage._fetch_file

    def counting(fs, remote, info, local):
        before = local.stat().st_mtime_ns if local.exists() else None
        real(fs, remote, info, local)
        calls.append((remote, before != local.stat().st_mtime_ns))

    monkeypatch.setattr(storage, "_fetch_file", counting)
    first = fetch(url)
    assert [downloaded for _, downloaded in calls] == [True]
    calls.clear()
    assert fetch(url) == first and [downloaded for _, downloaded in calls] == [False]
    # the object changes: the copy is refreshed, never served stale
    changed = {k: torch.zeros(s) for k, s in SHAPES.items()}
    save_tensors(tmp_path / "z.safetensors", changed)
    _put(tmp_path / "z.safetensors", url)
    calls.clear()
    assert torch.equal(load_tensors(fetch(url))["a.weight"], torch.zeros(8, 6))
    assert [downloaded for _, downloaded in calls] == [True]
    with pytest.raises(FileNotFoundError, match="'s3://.*/nothing.safetensors' does not exist"):
        Expert(f"{s3}/nothing.safetensors")


def test_a_failed_merge_uploads_nothing_and_a_replaced_folder_has_no_stale_files(s3, tmp_path):
    base, experts = _world(tmp_path / "local")
    out = f"{s3}/merged"
    merge(experts, base, Fisher(), out, shard_size=300)  # several shards + an index
    fs, path = filesystem(out)
    first = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))
    assert "model.safetensors.index.json" in first and len([f for f in first if f.startswith("model-")]) >= 2

    class Boom(Fisher):
        def merge_tensor(self, name, base, tensors, stats, prepared=None):
            if name == "b.weight":
                raise RuntimeError("boom")
            return super().merge_tensor(name, base, tensors, stats, prepared)

    with pytest.raises(RuntimeError, match="boom"):
        merge(experts, base, Boom(), f"{s3}/failed")
    assert not exists(f"{s3}/failed")

    fetched_first = fetch(out)
    assert (fetched_first / "model.safetensors.index.json").exists()
    merge(experts, base, Fisher(), out, overwrite=True)  # one shard now: the old shards and index are gone
    fs.invalidate_cache()
    second = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))
    assert "model.safetensors" in second and not any(f.startswith("model-") for f in second)
    assert "model.safetensors.index.json" not in second
    # and the cached copy follows: no stale shard or index is left to be read
    cached = sorted(p.name for p in fetch(out).iterdir() if not p.name.startswith("."))
    assert cached == sorted(second)
    got, want = load_tensors(fetch(out) / "model.safetensors"), merge(experts, base, Fisher())
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_upload_writes_the_entry_point_last(s3, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "model-00002-of-00002.safetensors", "lightning_merge.json"):
        (folder / name).write_text(name)
    fs, _ = filesystem(s3)  # fsspec caches the instance: upload() gets this one
    order = []
    real = fs.put_file

    def recording(lpath, rpath, *args, **kwargs):
        order.append(rpath.rsplit("/", 1)[-1])
        return real(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", recording)
    upload(folder, f"{s3}/out")
    assert order[-1] == "model.safetensors.index.json" and sorted(order) == sorted(p.name for p in folder.iterdir())


def test_statistics_load_from_a_url(s3, tmp_path):
    _, experts = _world(tmp_path / "local", n=1)
    side = find_sidecar(experts[0])
    url = _put(side, f"{s3}/run/e0.statistics.safetensors")
    assert find_sidecar(f"{s3}/run/e0.safetensors") == url
    remote, local = Statistics.load(url), Statistics.load(side)
    assert torch.equal(remote.get("a.weight", "fisher"), local.get("a.weight", "fisher"))


def _names(url):
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


@pytest.mark.slow
def test_capture_sidecars_follow_checkpoints_in_a_bucket_and_equal_a_local_run(s3, tmp_path):
    from capture_helpers import Tiny, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge.callbacks import CurvatureCapture

    def run(dirpath, root):
        ckpt = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)
        trainer(root, [CurvatureCapture(), ckpt], max_epochs=4).fit(Tiny(lr=1e-2), loader(), loader())
        return ckpt

    local = run(str(tmp_path / "ckpt"), tmp_path / "local")
    remote = run(f"{s3}/run/ckpt", tmp_path / "remote")
    names = _names(f"{s3}/run/ckpt")
    assert names == sorted(p.name for p in (tmp_path / "ckpt").iterdir())  # rotation removed the same sidecars
    assert len([n for n in names if n.endswith(".ckpt")]) == 3 and "final.statistics.safetensors" in names
    for url in remote.best_k_models:
        assert url.startswith(f"{s3}/run/ckpt/")
        expert = Expert(url)  # the checkpoint and its sidecar, fetched
        twin = Expert(tmp_path / "ckpt" / url.rsplit("/", 1)[-1])
        for name in ("net.0.weight", "net.2.bias"):
            assert torch.equal(expert.tensor(name), twin.tensor(name))
            assert torch.equal(expert.statistic(name, "exp_avg_sq"), twin.statistic(name, "exp_avg_sq"))
            assert torch.equal(expert.statistic(name, "fisher"), twin.statistic(name, "fisher"))
    assert set(local.best_k_models) != set(remote.best_k_models)


@pytest.mark.slow
def test_checkpoint_averaging_reads_and_writes_a_bucket(s3, tmp_path):
    from capture_helpers import Tiny, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge.callbacks import CheckpointAveraging

    ckpt = ModelCheckpoint(dirpath=f"{s3}/avg", monitor="val_loss", save_top_k=3)
    averaging = CheckpointAveraging(select="top_k", k=3)
    model = Tiny(lr=5e-2)
    trainer(tmp_path, [ckpt, averaging], max_epochs=4).fit(model, loader(), loader(16, 8, seed=1))
    assert "averaged.ckpt" in _names(f"{s3}/avg")
    saved = torch.load(fetch(f"{s3}/avg/averaged.ckpt"), weights_only=True)
    paths = [p for p, _ in averaging.averaged]
    assert len(paths) == 3 and all(p.startswith(f"{s3}/avg/") for p in paths)
    expected = sum(torch.load(fetch(p), weights_only=True)["state_dict"]["net.0.weight"] for p in paths) / 3
    torch.testing.assert_close(saved["state_dict"]["net.0.weight"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.state_dict()["net.0.weight"], expected, rtol=1e-6, atol=1e-7)

    from lightning_merge.cli.commands import main

    assert main(["average", *paths, "--out", f"{s3}/avg/cli.ckpt"]) == 0  # the command line takes URLs too
    by_cli = torch.load(fetch(f"{s3}/avg/cli.ckpt"), weights_only=True)
    torch.testing.assert_close(by_cli["state_dict"]["net.0.weight"], expected, rtol=1e-6, atol=1e-7)
    assert main(["average", *paths, "--out", f"{s3}/avg/cli.ckpt"]) != 0  # exists: --overwrite needed


def test_cli_merges_a_recipe_of_urls_into_a_bucket(s3, tmp_path, capsys):
    from lightning_merge.cli.commands import main

    base, experts = _world(tmp_path / "local")
    for p in [base, *experts]:
        _put(p, f"{s3}/m/{p.name}")
        if find_sidecar(p):
            _put(find_sidecar(p), f"{s3}/m/{Path(find_sidecar(p)).name}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: fisher\nbase_model: {s3}/m/base.safetensors\nmodels:\n"
        + "".join(f"  - model: {s3}/m/e{i}.safetensors\n" for i in range(3))
    )
    assert main(["merge", str(recipe), f"{s3}/out", "--dry-run"]) == 0
    assert "s3://" in capsys.readouterr().out
    assert main(["merge", str(recipe), f"{s3}/out"]) == 0
    got = load_tensors(fetch(f"{s3}/out") / "model.safetensors")
    want = merge(experts, base, Fisher())
    assert all(torch.equal(got[k], want[k]) for k in want)
    provenance = json.loads((fetch(f"{s3}/out") / "lightning_merge.json").read_text())
    assert provenance["base"] == f"{s3}/m/base.safetensors"
    capsys.readouterr()
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {s3}/m/missing.safetensors\n")
    assert main(["merge", str(recipe), str(tmp_path / "x")]) != 0
    assert f"'{s3}/m/missing.safetensors' not found (nothing exists at that URL)" in capsys.readouterr().err


def test_merge_on_fit_end_writes_into_a_bucket_and_loads_the_merge(s3, tmp_path):
    from capture_helpers import Tiny, loader, trainer

    from lightning_merge.callbacks import CurvatureCapture, MergeOnFitEnd

    local_run = tmp_path / "local"
    trainer(local_run, [CurvatureCapture(dirpath=str(local_run / "expert"))], max_epochs=1).fit(Tiny(lr=1e-2),
                                                                                                  loader())
    expert = _put(local_run / "expert" / "final.safetensors", f"{s3}/experts/other.safetensors")
    _put(local_run / "expert" / "final.statistics.safetensors", f"{s3}/experts/other.statistics.safetensors")

    def fit(root, dirpath):
        merger = MergeOnFitEnd(experts=[expert], strategy=Fisher(), dirpath=dirpath)
        model = Tiny(lr=1e-2)
        trainer(root, [CurvatureCapture(save_final=False), merger], max_epochs=1).fit(model, loader(seed=4))
        return merger, model

    remote, remote_model = fit(tmp_path / "a", f"{s3}/run")
    local, local_model = fit(tmp_path / "b", str(tmp_path / "b" / "out"))
    assert remote.merged_path == f"{s3}/run/merged.safetensors"
    assert "merge_base_snapshot.safetensors" in _names(f"{s3}/run")
    got, want = load_tensors(fetch(remote.merged_path)), load_tensors(local.merged_path)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(remote_model.state_dict().values(), local_model.state_dict().values()))


def _family(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    return write_family(root)


def _put_family(s3, base, paths):
    urls = []
    for p in [base, *paths]:
        urls.append(_put(p, f"{s3}/family/{p.name}"))
        side = find_sidecar(p)
        if side is not None:
            _put(Path(side), f"{s3}/family/{Path(side).name}")
    return urls[0], urls[1:]


@pytest.mark.slow
def test_a_continual_state_in_a_bucket_folds_like_a_local_one(s3, tmp_path):
    from lightning_merge import ContinualState

    base, paths = _family(tmp_path / "family")
    base_url, urls = _put_family(s3, base, paths)
    local = ContinualState.create(tmp_path / "state", base=base, strategy=Fisher())
    remote = ContinualState.create(f"{s3}/state", base=base_url, strategy=Fisher())
    with pytest.raises(FileExistsError, match="already exists"):
        ContinualState.create(f"{s3}/state", base=base_url, strategy=Fisher())
    for p, u in zip(paths, urls):
        local.add(p)
        remote.add(u)
    # a fresh object (another machine: its own mirror) reads the committed state
    again = ContinualState(f"{s3}/state")
    assert again.count == 4 and [e["path"] for e in again.journal] == urls
    want, got = local.state_dict(), again.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    names = _names(f"{s3}/state")
    assert names.count("meta.json") == 1  # the previous generations were deleted after each commit
    assert "LEASE" not in names
    assert again.describe()["model"].startswith(f"{s3}/state/generations/")


def test_a_lost_compare_and_swap_commits_nothing_and_the_retry_folds_on_top(s3, tmp_path, monkeypatch):
    from lightning_merge import ContinualState, Linear

    base, paths = _family(tmp_path / "family")
    base_url, urls = _put_family(s3, base, paths)
    first = ContinualState.create(f"{s3}/state", base=base_url, strategy=Linear())
    etag = first._pull()
    monkeypatch.setenv("LIGHTNING_MERGE_CACHE", str(tmp_path / "other-machine"))
    second = ContinualState(f"{s3}/state")
    assert second.path != first.path
    second.add(urls[0])  # commits while `first` is between its pull and its commit
    first._add_locked(Expert(urls[1]), None, False, False, False, None)
    with pytest.raises(Exception, match="another writer committed while this expert was being added; nothing was "
                                        "committed by this add: retry it"):
        first._push(etag)
    assert ContinualState(f"{s3}/state").count == 1
    first.add(urls[1])  # the retry pulls the other writer's generation and folds on top of it
    final = ContinualState(f"{s3}/state")
    assert [e["path"] for e in final.journal] == urls[:2]
    want = merge(paths[:2], base, Linear())
    got = final.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_a_crash_while_uploading_a_generation_leaves_the_committed_state(s3, tmp_path, monkeypatch):
    import lightning_merge.continual.remote as continual
    from lightning_merge import ContinualState, Linear

    base, paths = _family(tmp_path / "family")
    base_url, urls = _put_family(s3, base, paths)
    state = ContinualState.create(f"{s3}/state", base=base_url, strategy=Linear())
    state.add(urls[0])
    before = ContinualState(f"{s3}/state").state_dict()
    real = continual.upload

    def crash(local, url, **kwargs):
        fs, path = filesystem(url)
        first = sorted(p for p in Path(local).rglob("*") if p.is_file())[0]
        fs.put_file(str(first), path + "/" + first.relative_to(local).as_posix())  # part of it landed
        raise OSError("connection lost")

    monkeypatch.setattr(continual, "upload", crash)
    with pytest.raises(OSError, match="connection lost"):
        state.add(urls[1])
    monkeypatch.setattr(continual, "upload", real)
    reader = ContinualState(f"{s3}/state")
    assert reader.count == 1
    assert all(torch.equal(reader.state_dict()[k], v) for k, v in before.items())
    state.add(urls[1])  # the retry (its mirror was ahead of the commit: it pulls the committed state again)
    assert ContinualState(f"{s3}/state").count == 2
    assert _names(f"{s3}/state").count("meta.json") == 1  # the crashed upload's orphan is gone


def test_a_continual_state_needs_conditional_writes(tmp_path):
    from lightning_merge import ContinualState, Linear

    base, _ = _family(tmp_path / "family")
    with pytest.raises(ValueError, match="memory:// is not supported: keep the state on a local or network"):
        ContinualState.create("memory://bucket/state", base=base, strategy=Linear())


@pytest.mark.slow
def test_callbacks_under_ddp_write_checkpoints_sidecars_and_a_continual_state_to_a_bucket(s3, tmp_path):
    from capture_helpers import Tiny, ddp_loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_merge import ContinualState, TaskArithmetic
    from lightning_merge.callbacks import ContinualMerge, CurvatureCapture

    base = _put(tiny_base(tmp_path), f"{s3}/base.safetensors")
    trainer(
        tmp_path / "run",
        [CurvatureCapture(), ModelCheckpoint(dirpath=f"{s3}/ddp/ckpt", save_top_k=1),
         ContinualMerge(state=f"{s3}/ddp/state", base=base, strategy=TaskArithmetic(), name="run0")],
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    ).fit(Tiny(lr=5e-2), ddp_loader(32, 4))
    names = _names(f"{s3}/ddp/ckpt")
    ckpts = [n for n in names if n.endswith(".ckpt")]
    assert len(ckpts) == 1 and ckpts[0].replace(".ckpt", ".statistics.safetensors") in names  # rank 0 wrote once
    state = ContinualState(f"{s3}/ddp/state")
    assert state.count == 1 and state.journal[0]["name"] == "run0"
    expert = Expert(f"{s3}/ddp/ckpt/{ckpts[0]}")
    assert expert.has_statistic("exp_avg_sq") and expert.has_statistic("fisher")
