"""Outputs never lose or expose a user's data (issue 27: items 1, 2, 3, 5, 6 and 10, and the probes beyond them).

One rule (lightning_merge.files.ownership) for every output: an existing path is replaced only if it is an earlier
output of lightning-merge (a folder's lightning_merge.json lists every file in it; a safetensors file's metadata or a
.ckpt's top-level dict carries the lightning_merge mark) or an empty folder. Every case below checks the error the
user sees and that nothing was lost (the same files with the same bytes).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, family

from lightning_merge import Expert, Fisher, Linear, TaskArithmetic, merge, tall
from lightning_merge.cli.commands import main as cli
from lightning_merge.files.ownership import (
    INCOMPLETE_NAME,
    PROVENANCE_NAME,
    ForeignOutput,
    IncompleteOutput,
    local_reason,
    top_level_keys,
)
from lightning_merge.files.remote import redact
from lightning_merge.files.safetensors import load_tensors, save_tensors
from lightning_merge.formats.sidecar import export_second_moments, write_statistics
from lightning_merge.tools.averaging import average_checkpoints
from lightning_merge.tools.diagnostics import report


def tree(path: Path) -> dict[str, object]:
    """What is at ``path``, byte for byte, without following links or opening special files."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return {".": ("link", os.readlink(path))}
    if stat.S_ISREG(info.st_mode):
        return {".": path.read_bytes()}
    if not stat.S_ISDIR(info.st_mode):
        return {".": ("special", stat.S_IFMT(info.st_mode), info.st_rdev)}
    out: dict[str, object] = {".": "folder"}
    for item in sorted(path.rglob("*")):
        if item.is_symlink():
            out[item.relative_to(path).as_posix()] = ("link", os.readlink(item))
        elif item.is_file():
            out[item.relative_to(path).as_posix()] = item.read_bytes()
        else:
            out[item.relative_to(path).as_posix() + "/"] = "folder"
    return out


def same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-merge: error: "), err
    return err[0]


def recipe(root: Path, base: Path, paths: list[Path], method: str = "linear") -> str:
    text = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}
    (root / f"{method}.yaml").write_text(json.dumps(text))
    return str(root / f"{method}.yaml")


# -- 1. overwrite replaces only the tool's own outputs -------------------------------------------------------------


def test_overwrite_refuses_a_project_folder_and_keeps_every_file(tmp_path):
    base, paths = family(tmp_path)
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.txt").write_text("keep")
    (proj / "src" / "main.py").write_text("print('hi')")
    before = tree(proj)
    for overwrite in (True, False):  # the same refusal with or without the flag (never "pass overwrite=True")
        with pytest.raises(ForeignOutput, match=r"output '.*proj' is a folder lightning-merge did not write \(it "
                                                r"holds notes.txt, src/ and no lightning_merge.json\)"):
            merge(paths, base, Linear(), out=proj, overwrite=overwrite)
    assert tree(proj) == before


def test_the_command_line_refuses_it_in_one_line(tmp_path, capsys):
    base, paths = family(tmp_path)
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.txt").write_text("keep")
    before = tree(proj)
    assert cli(["merge", recipe(tmp_path, base, paths), str(proj), "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert f"output '{proj}' is a folder lightning-merge did not write" in line and "whatever overwrite says" in line
    assert tree(proj) == before


def _user_safetensors(p: Path) -> None:
    save_tensors(p, {"w": torch.ones(4, 4)})  # a plain safetensors file: no lightning_merge mark


def _user_checkpoint(p: Path) -> None:  # the key nested deeper, and as a value, is not the mark
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lightning_merge": 1},
                "note": "lightning_merge"}, p)


def _text_file(p: Path) -> None:
    p.write_text("a user's notes that happen to carry the output's name")


def _link_to_an_earlier_output(p: Path) -> None:  # even a link to the tool's own output: the link is not the tool's
    base, paths = family(p.parent / "w")
    merge(paths, base, Linear(), out=p.parent / "elsewhere" / p.name)
    os.symlink(p.parent / "elsewhere" / p.name, p)


def _dangling_link(p: Path) -> None:
    os.symlink(p.parent / "nowhere", p)


def _fifo(p: Path) -> None:  # never opened: opening a FIFO would hang
    os.mkfifo(p)


def _device_node(p: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers


def _earlier_output_plus_a_user_file(p: Path) -> None:
    base, paths = family(p.parent / "w")
    merge(paths, base, Linear(), out=p)
    (p / "notes.txt").write_text("keep")


def _earlier_output_with_an_unlisted_link(p: Path) -> None:
    base, paths = family(p.parent / "w")
    merge(paths, base, Linear(), out=p)
    os.symlink("/etc", p / "etc")


def _provenance_without_a_file_list(p: Path) -> None:  # written by an earlier version, or by hand
    p.mkdir()
    (p / PROVENANCE_NAME).write_text(json.dumps({"library": "lightning-merge"}))
    save_tensors(p / "model.safetensors", {"w": torch.ones(2)})


FOREIGN = [
    ("a user's safetensors file", "out.safetensors", _user_safetensors, "is a file lightning-merge did not write"),
    ("a user's checkpoint", "out.ckpt", _user_checkpoint, "is a file lightning-merge did not write"),
    ("a text file", "out.safetensors", _text_file, "is a file lightning-merge did not write"),
    ("a link to an earlier output", "out", _link_to_an_earlier_output, "is a symbolic link \\(to '.*elsewhere"),
    ("a dangling link", "out", _dangling_link, "is a symbolic link"),
    ("a FIFO", "out", _fifo, "is a FIFO"),
    ("a device node", "out", _device_node, "is a device node"),
    ("an earlier output holding a user's file", "out", _earlier_output_plus_a_user_file,
     "holds files lightning-merge did not write \\(notes.txt: not in its lightning_merge.json\\)"),
    ("an earlier output holding a link", "out", _earlier_output_with_an_unlisted_link, "holds a symbolic link"),
    ("a provenance file without a file list", "out", _provenance_without_a_file_list, "lists no files"),
]


@pytest.mark.parametrize("name,out_name,make,match", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_overwrite_never_replaces_what_the_tool_did_not_write(tmp_path, name, out_name, make, match):
    base, paths = family(tmp_path)
    out = tmp_path / out_name
    make(out)
    before = tree(out)
    target = tree(out.resolve()) if out.is_symlink() and out.exists() else None
    with pytest.raises(ForeignOutput, match=match) as info:
        merge(paths, base, Linear(), out=out, overwrite=True)
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert tree(out) == before
    if target is not None:
        assert tree(out.resolve()) == target


def test_a_device_node_named_as_a_checkpoint_output_is_refused_before_any_work(tmp_path):
    """As root the issue's device node became a folder; a .ckpt output named by a character device is refused."""
    base, paths = family(tmp_path)
    out = tmp_path / "dev.ckpt"
    _device_node(out)
    with pytest.raises(ForeignOutput, match="is a device node"):
        merge(paths, base, Linear(), out=out, overwrite=True)
    assert stat.S_ISCHR(os.lstat(out).st_mode)


def test_an_empty_folder_is_replaced(tmp_path):
    base, paths = family(tmp_path)
    (tmp_path / "empty").mkdir()
    merge(paths, base, Linear(), out=tmp_path / "empty", overwrite=True)
    assert same(load_tensors(tmp_path / "empty" / "model.safetensors"), merge(paths, base, Linear()))


def _rewrite(kind: str, root: Path):
    """Write an output of ``kind`` twice (the second with overwrite=True and other values); returns (out, want)."""
    base, paths = family(root)
    first, second = TaskArithmetic(scale=0.3), TaskArithmetic(scale=0.7)
    if kind in ("folder", "sharded folder", "file", "checkpoint"):
        out = root / {"folder": "m", "sharded folder": "m", "file": "m.safetensors", "checkpoint": "m.ckpt"}[kind]
        shard = 40 if kind == "sharded folder" else "5GB"
        merge(paths, base, first, out=out, shard_size=shard)
        with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
            merge(paths, base, second, out=out, shard_size=shard)
        merge(paths, base, second, out=out, overwrite=True, shard_size=shard)
        return Expert(out), merge(paths, base, second)
    if kind == "tall":
        tall.compress(paths, base, root / "t", strategy=first)
        with pytest.raises(FileExistsError, match="already exists"):
            tall.compress(paths, base, root / "t", strategy=second)
        got = tall.compress(paths, base, root / "t", strategy=second, overwrite=True)
        want = tall.compress(paths, base, root / "t2", strategy=second)
        assert all(torch.equal(got.task_vector(k), want.task_vector(k)) for k in ("w", "b"))
        return None, None
    if kind == "report":
        report(paths, base, first).save(root / "r")
        report(paths, base, second).save(root / "r", overwrite=True)
        data = json.loads((root / "r" / "report.json").read_text())
        assert data["strategy"]["scale"] == 0.7
        return None, None
    if kind == "average":
        for i in range(3):
            torch.save({"state_dict": {"w": torch.full((2,), float(i))}, "global_step": i}, root / f"c{i}.ckpt")
        ckpts = [root / f"c{i}.ckpt" for i in range(3)]
        average_checkpoints(ckpts[:2], root / "avg.ckpt")
        average_checkpoints(ckpts, root / "avg.ckpt", overwrite=True)
        assert torch.equal(torch.load(root / "avg.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(2))
        return None, None
    if kind == "exported second moments":
        export_second_moments(root / "e0.statistics.safetensors", root / "v.safetensors")
        with pytest.raises(FileExistsError, match="already exists"):
            export_second_moments(root / "e1.statistics.safetensors", root / "v.safetensors")
        export_second_moments(root / "e1.statistics.safetensors", root / "v.safetensors", overwrite=True)
        from lightning_merge.formats.sidecar import Statistics

        want = Statistics.load(root / "e1.statistics.safetensors")
        got = load_tensors(root / "v.safetensors")
        assert all(torch.equal(got[k], want.raw(k, "exp_avg_sq")) for k in ("w", "b"))
        return None, None
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["folder", "sharded folder", "file", "checkpoint", "tall", "report", "average",
                                  "exported second moments"])
def test_the_tools_own_outputs_stay_replaceable(tmp_path, kind):
    expert, want = _rewrite(kind, tmp_path)
    if expert is not None:
        got = {k: expert.tensor(k) for k in expert.names()}
        assert same(got, {k: v.to(got[k].dtype) for k, v in want.items()})


def test_a_peft_adapter_output_stays_replaceable(tmp_path):
    from conftest import write_lora_family

    base, adapters = write_lora_family(tmp_path, n=2)
    out = tmp_path / "merged-adapter"
    merge(adapters, base, TaskArithmetic(scale=0.5), out=out, output="peft")
    merge(adapters, base, TaskArithmetic(scale=0.25), out=out, output="peft", overwrite=True)
    record = json.loads((out / PROVENANCE_NAME).read_text())
    assert record["strategy"]["scale"] == 0.25
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != PROVENANCE_NAME)


def test_provenance_lists_every_file_the_merge_wrote(tmp_path):
    base, paths = family(tmp_path)
    out = merge(paths, base, Linear(), out=tmp_path / "m", shard_size=40)
    record = json.loads((out / PROVENANCE_NAME).read_text())
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != PROVENANCE_NAME)
    assert len(record["files"]) > 2 and "model.safetensors.index.json" in record["files"]
    assert local_reason(out) is None


def test_checkpoint_marks_are_read_from_the_pickle_without_running_it(tmp_path):
    """The top-level keys come from walking the pickle's opcodes: a key nested deeper, a value that equals the
    key, and a memoised string reused as a top-level key are all told apart, and no class is ever imported."""
    torch.save({"hyper_parameters": {"lightning_merge": 1}, "lightning_merge": 2}, tmp_path / "memo.ckpt")
    torch.save({"hyper_parameters": {"lightning_merge": 1}}, tmp_path / "nested.ckpt")
    torch.save(["lightning_merge"], tmp_path / "list.ckpt")
    assert local_reason(tmp_path / "memo.ckpt") is None
    assert local_reason(tmp_path / "nested.ckpt") is not None and local_reason(tmp_path / "list.ckpt") is not None
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    data = pickle.dumps({"lightning_merge": 1, "x": Evil()}, protocol=2)
    assert top_level_keys(data) == {"lightning_merge", "x"} and not (tmp_path / "pwned").exists()


def test_merge_on_fit_end_refuses_a_users_file_and_rewrites_its_own(tmp_path):
    from capture_helpers import Tiny, loader, trainer

    from lightning_merge.callbacks import CurvatureCapture, MergeOnFitEnd

    run = tmp_path / "run"
    run.mkdir()
    (run / "merged.safetensors").write_text("a user's file")
    merger = MergeOnFitEnd(experts=[], strategy=TaskArithmetic(), dirpath=str(run))
    with pytest.raises(ForeignOutput, match="merged.safetensors' is a file lightning-merge did not write"):
        trainer(run, [merger], max_epochs=1).fit(Tiny(lr=5e-2), loader(16, 8, seed=1))
    assert (run / "merged.safetensors").read_text() == "a user's file"
    (run / "merged.safetensors").unlink()
    for seed in (1, 2):  # a callback rewrites its own outputs at every fit (merged, snapshot, final, sidecars)
        capture = CurvatureCapture()
        merger = MergeOnFitEnd(experts=[], strategy=TaskArithmetic(), dirpath=str(run))
        model = Tiny(lr=5e-2)
        trainer(run, [merger, capture], max_epochs=1).fit(model, loader(16, 8, seed=seed))
        on_disk = Expert(run / "merged.safetensors")
        assert all(torch.equal(on_disk.tensor(k), v) for k, v in model.state_dict().items())


# -- 2. object storage: outputs that are inputs, and replacing only what the tool wrote -------------------------


def _bucket(s3: str, root: Path) -> tuple[str, list[str]]:
    from lightning_merge.files.remote import filesystem

    base, paths = family(root)
    fs, _ = filesystem(s3)
    urls = []
    for p in [base, *paths]:
        fs.put_file(str(p), f"{s3}/run/{p.name}".split("://", 1)[1])
        urls.append(f"{s3}/run/{p.name}")
    return urls[0], urls[1:]


def _objects(url: str) -> dict[str, bytes]:
    from lightning_merge.files.remote import filesystem

    fs, path = filesystem(url)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in sorted(fs.find(path))}


@pytest.mark.parametrize("out", ["{s3}/run", "{s3}/run/", "{s3}", "{s3}/run/e0.safetensors",
                                 "{s3}//run/e0.safetensors/", "{s3}/run/e0.statistics.safetensors",
                                 "{s3}/run/e0.safetensors/inside"])
def test_an_s3_output_that_is_holds_or_lies_in_an_input_is_refused(s3, tmp_path, out):
    base, urls = _bucket(s3, tmp_path)
    before = _objects(s3)
    with pytest.raises(ValueError, match="an input of this merge"):
        merge(urls, None, Linear(), out=out.format(s3=s3), overwrite=True)
    with pytest.raises(ValueError, match="an input of this merge"):
        merge(urls, None, Linear(), out=out.format(s3=s3), overwrite=True, dry_run=True)
    assert _objects(s3) == before


@pytest.mark.slow
def test_an_s3_upload_never_replaces_or_deletes_objects_the_tool_did_not_write(s3, tmp_path):
    from lightning_merge.files.remote import filesystem, upload

    base, urls = _bucket(s3, tmp_path)
    fs, _ = filesystem(s3)
    fs.pipe_file(f"{s3}/user.safetensors".split("://", 1)[1], b"a user's object")
    before = _objects(s3)
    with pytest.raises(ForeignOutput, match="is an object lightning-merge did not write"):
        merge(urls, base, Linear(), out=f"{s3}/user.safetensors", overwrite=True)
    out = f"{s3}/merged"
    merge(urls, base, Linear(), out=out, shard_size=40)
    fs.pipe_file(f"{out}/notes.txt".split("://", 1)[1], b"keep")
    with_notes = _objects(out)
    with pytest.raises(ForeignOutput, match="holds files lightning-merge did not write \\(notes.txt"):
        merge(urls, base, TaskArithmetic(), out=out, overwrite=True)
    local = tmp_path / "plain"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ForeignOutput):
        upload(local, out, replace=True)
    assert _objects(out) == with_notes
    assert {k: v for k, v in _objects(s3).items() if not k.split("/", 1)[1].startswith("merged")} == before


# -- 3. average and export: an output that is an input -------------------------------------------------------------


def test_average_refuses_an_output_that_is_one_of_its_checkpoints(tmp_path, capsys):
    for i in range(3):
        torch.save({"state_dict": {"w": torch.full((2,), float(i))}, "global_step": i}, tmp_path / f"c{i}.ckpt")
    before = tree(tmp_path)
    files = [str(tmp_path / f"c{i}.ckpt") for i in range(3)]
    assert cli(["average", *files, "--out", files[2], "--overwrite"]) == 2
    assert f"output '{files[2]}' is an input of this merge" in one_line_error(capsys)
    assert tree(tmp_path) == before
    # a re-run over a glob that includes the earlier average: the average is skipped as an input and replaced
    assert cli(["average", *files, "--out", str(tmp_path / "avg.ckpt")]) == 0
    capsys.readouterr()
    assert cli(["average", *files, str(tmp_path / "avg.ckpt"), "--out", str(tmp_path / "avg.ckpt"),
                "--overwrite"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "avg.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(2))


@pytest.mark.parametrize("out", ["e0.safetensors", "e0.statistics.safetensors"])
def test_export_second_moments_refuses_its_own_inputs(tmp_path, capsys, out):
    family(tmp_path)
    before = tree(tmp_path)
    assert cli(["export-second-moments", str(tmp_path / "e0.safetensors"), str(tmp_path / out), "--overwrite"]) == 2
    assert f"output '{tmp_path / out}' is an input" in one_line_error(capsys)
    assert tree(tmp_path) == before


# -- 5. credentials in URLs ------------------------------------------------------------------------------------------


def test_redact_hides_credentials_and_signatures():
    assert redact("s3://AKIAKEY:SECRET@bucket/run/e0") == "s3://***@bucket/run/e0"
    assert redact("s3://AKIA:se/cr+et@bucket/x") == "s3://***@bucket/x"  # a secret holding a slash
    assert redact("s3://bucket/run@v2/x") == "s3://bucket/run@v2/x"  # an @ in a key is no credential
    url = ("https://b.s3.amazonaws.com/k.ckpt?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F20260101&"
           "X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok")
    assert redact(f"error reading '{url}'") == ("error reading 'https://b.s3.amazonaws.com/k.ckpt?X-Amz-Algorithm=AWS4"
                                               "&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***'")
    assert redact("https://a.blob.core.windows.net/c/x?sv=2022&sig=abc%3D&se=2026") == \
        "https://a.blob.core.windows.net/c/x?sv=2022&sig=***&se=2026"
    assert redact("https://d.cloudfront.net/x?Expires=1&Signature=abc&Key-Pair-Id=K") == \
        "https://d.cloudfront.net/x?Expires=1&Signature=***&Key-Pair-Id=***"


def test_credentials_in_urls_never_reach_names_provenance_errors_or_logs(s3, tmp_path, capsys, caplog):
    import logging

    base, urls = _bucket(s3, tmp_path)
    secret_url = urls[0].replace("s3://", "s3://AKIAKEY:SUPERSECRET@")
    caplog.set_level(logging.INFO, logger="lightning_merge")
    expert = Expert(secret_url)
    assert expert.name == urls[0].replace("s3://", "s3://***@")
    out = merge([secret_url, urls[1]], None, Linear(), out=f"{s3}/merged")
    record = (Path(Expert(out).path) / PROVENANCE_NAME).read_text()
    assert "SUPERSECRET" not in record and "AKIAKEY" not in record and "s3://***@" in record
    with pytest.raises(FileNotFoundError) as info:
        Expert(secret_url.replace("e0", "nope"))
    assert "SUPERSECRET" not in str(info.value) and "***@" in str(info.value)
    with pytest.raises(ValueError, match="an input of this merge") as info:  # the output is the input, by URL
        merge([secret_url, urls[1]], None, Linear(), out=urls[0] + "/", overwrite=True)
    assert "SUPERSECRET" not in str(info.value)
    assert cli(["average", secret_url.replace("e0.safetensors", "nope.ckpt"), "--out", str(tmp_path / "a.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "SUPERSECRET" not in err and "AKIAKEY" not in err and "does not exist" in err
    assert not [r for r in caplog.records if "SUPERSECRET" in r.getMessage()]


def test_the_command_line_printer_redacts_any_message(capsys, monkeypatch):
    import lightning_merge.cli.commands as cli_module

    def boom(args):
        raise RuntimeError("could not read https://b/x?X-Amz-Signature=SIG123&X-Amz-Credential=AKIA and "
                           "s3://K:S3CR3T@b/y")

    monkeypatch.setattr(cli_module, "cmd_inspect", boom)  # bound when main() builds the parser
    assert cli(["inspect", "x"]) == 2
    line = one_line_error(capsys)
    assert "SIG123" not in line and "S3CR3T" not in line and "AKIA" not in line and "X-Amz-Signature=***" in line


def test_a_url_cut_at_the_message_limit_still_hides_its_credentials(capsys, monkeypatch):
    import lightning_merge.cli.commands as cli_module

    def boom(args):  # the limit falls inside the secret: redacting after the cut found no "@" and kept it
        raise ValueError("x" * (cli_module.MAX_MESSAGE - 20) + " s3://AKIAKEY:SUPERSECRET@bucket/run/e0.safetensors")

    monkeypatch.setattr(cli_module, "cmd_inspect", boom)
    assert cli(["inspect", "x"]) == 2
    line = one_line_error(capsys)
    assert "AKIAKEY" not in line and "SUPERS" not in line and "(cut: " in line


def test_inspect_export_and_continual_never_print_or_store_a_urls_credentials(s3, tmp_path, capsys):
    from lightning_merge import ContinualState
    from lightning_merge.continual.state import ContinualError
    from lightning_merge.files.remote import filesystem

    base, urls = _bucket(s3, tmp_path)
    fs, _ = filesystem(s3)
    fs.put_file(str(tmp_path / "e0.statistics.safetensors"), f"{s3}/run/e0.statistics.safetensors".split("://")[1])
    secret = s3.replace("s3://", "s3://AKIAKEY:SUPERSECRET@")
    e0 = urls[0].replace(s3, secret)
    local_base, local_paths = family(tmp_path / "local")

    def printed(argv: list[str], rc: int = 0) -> str:
        assert cli(argv) == rc, capsys.readouterr()
        text = "".join(capsys.readouterr())
        assert "SUPERSECRET" not in text and "AKIAKEY" not in text, text
        return text

    # a URL given to inspect or export-second-moments was folded by Path ("s3:/KEY:SECRET@...") and echoed
    assert f"{secret.replace('AKIAKEY:SUPERSECRET', '***')}/run/e0.safetensors (model)" in printed(["inspect", e0])
    assert "exp_avg_sq" in printed(["inspect", e0.replace(".safetensors", ".statistics.safetensors")])
    assert "does not exist" in printed(["inspect", e0.replace("e0", "nope")], rc=2)
    printed(["export-second-moments", e0, str(tmp_path / "sm.safetensors")])
    assert set(load_tensors(tmp_path / "sm.safetensors")) == {"w", "b"}
    assert "wrote s3://***@" in printed(["export-second-moments", e0, f"{secret}/out/sm.safetensors"])
    # continual: the state's URL in what it prints; a base URL with credentials would be written into state.json
    with pytest.raises(ContinualError, match="carries credentials") as info:
        ContinualState.create(tmp_path / "state", base=urls[0].replace(s3, secret), strategy=Linear())
    assert "SUPERSECRET" not in str(info.value) and not (tmp_path / "state").exists()
    state = f"{secret}/state"
    printed(["continual", "init", state, "--base", str(local_base), "--strategy", "linear"])
    assert "added" in printed(["continual", "add", state, str(local_paths[0])])
    assert "1 expert(s)" in printed(["continual", "show", state])
    assert json.loads(printed(["continual", "show", state, "--json"]))["count"] == 1
    assert ContinualState(state).count == 1
    fs.invalidate_cache()
    assert not [p for p in fs.find(s3.split("://", 1)[1]) if b"SUPERSECRET" in fs.cat_file(p)]


# -- 6. an interrupted s3 replacement never loads as a mix -------------------------------------------------------


def test_an_interrupted_s3_replacement_is_refused_then_retried_cleanly(s3, tmp_path, monkeypatch):
    from lightning_merge.files.remote import filesystem

    base, paths = family(tmp_path, shape=(8, 8))
    out = f"{s3}/merged"
    merge(paths, base, Linear(), out=out, shard_size=100)  # several shards + an index
    old_names = sorted(k.rsplit("/", 1)[1] for k in _objects(out))
    assert "model.safetensors.index.json" in old_names and len([n for n in old_names if n.startswith("model-")]) >= 2
    fs, _ = filesystem(s3)
    real = fs.put_file
    calls = []

    def crash_after_one_shard(lpath, rpath, *args, **kwargs):
        if rpath.rsplit("/", 1)[-1].startswith("model-"):
            calls.append(rpath)
            if len(calls) == 2:
                raise ConnectionError("the network went away")
        return real(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", crash_after_one_shard)
    new = TaskArithmetic(scale=0.5)
    with pytest.raises(ConnectionError):
        merge(paths, base, new, out=out, shard_size=100, overwrite=True)
    monkeypatch.setattr(fs, "put_file", real)
    names = sorted(k.rsplit("/", 1)[1] for k in _objects(out))
    assert INCOMPLETE_NAME in names and "model.safetensors.index.json" not in names  # new shard 1, old shard 2
    with pytest.raises(IncompleteOutput, match="is incomplete: an upload of it is in progress or was interrupted"):
        Expert(out)
    local_copy = tmp_path / "copy"  # a copy of the bucket folder (aws s3 sync) is refused the same way
    fs.get(out.split("://", 1)[1] + "/", str(local_copy), recursive=True)
    with pytest.raises(IncompleteOutput):
        Expert(local_copy)
    merge(paths, base, new, out=out, shard_size=100, overwrite=True)  # the retry replaces the interrupted upload
    names = sorted(k.rsplit("/", 1)[1] for k in _objects(out))
    assert INCOMPLETE_NAME not in names
    record = json.loads(_objects(out)[f"{out.split('://', 1)[1]}/{PROVENANCE_NAME}"])
    assert sorted(record["files"]) == [n for n in names if n != PROVENANCE_NAME]
    expert = Expert(out)
    assert same({k: expert.tensor(k) for k in expert.names()}, merge(paths, base, new))


def test_a_folder_replaced_while_it_is_fetched_is_fetched_again_never_mixed(s3, tmp_path, monkeypatch):
    import lightning_merge.files.remote as storage

    base, paths = family(tmp_path, shape=(8, 8))
    out = f"{s3}/merged"
    merge(paths, base, Linear(), out=out, shard_size=100)
    real = storage._fetch_file
    raced = []

    def racing(fs, remote, info, local):
        real(fs, remote, info, local)
        if not raced:  # another process replaces the folder after the first file came down
            raced.append(remote)
            merge(paths, base, TaskArithmetic(scale=0.5), out=out, shard_size=100, overwrite=True)

    monkeypatch.setattr(storage, "_fetch_file", racing)
    expert = Expert(out)
    assert raced and same({k: expert.tensor(k) for k in expert.names()},
                          merge(paths, base, TaskArithmetic(scale=0.5)))


# -- 10. concurrent writers ------------------------------------------------------------------------------------------


class Interloper(Linear):
    """Linear, but another command writes the same output while this merge is in its first tensor."""

    hook: list = []

    def merge_tensor(self, name, base, tensors, stats, prepared=None):
        while Interloper.hook:
            Interloper.hook.pop()()
        return super().merge_tensor(name, base, tensors, stats, prepared)


@pytest.mark.parametrize("out_name", ["m", "m.safetensors", "m.ckpt"])
def test_a_second_merge_to_the_same_new_output_fails_and_the_first_is_kept(tmp_path, out_name):
    base, paths = family(tmp_path)
    out = tmp_path / out_name
    Interloper.hook = [lambda: merge(paths, base, Fisher(), out=out)]  # the first command commits meanwhile
    with pytest.raises(FileExistsError, match="was created by another process while this one was writing it"):
        merge(paths, base, Interloper(), out=out)
    expert = Expert(out)
    assert same({k: expert.tensor(k) for k in expert.names()}, merge(paths, base, Fisher()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out_name}.")]  # nothing left behind


def test_a_second_merge_to_the_same_new_url_fails_and_the_first_is_kept(s3, tmp_path):
    base, paths = family(tmp_path)
    for out in (f"{s3}/m", f"{s3}/m.safetensors"):
        Interloper.hook = [lambda out=out: merge(paths, base, Fisher(), out=out)]
        with pytest.raises(FileExistsError, match="was created by another process while this one was writing it"):
            merge(paths, base, Interloper(), out=out)
        expert = Expert(out)
        assert same({k: expert.tensor(k) for k in expert.names()}, merge(paths, base, Fisher()))
        assert INCOMPLETE_NAME not in " ".join(_objects(out))


def _big_family(root: Path) -> tuple[Path, list[Path]]:
    return family(root, shape=(1024, 2048))  # 8 MB per tensor: a merge of a second or so


def _run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lightning_merge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_merge_commands_to_one_new_output_one_wins_and_the_other_says_so(tmp_path):
    base, paths = _big_family(tmp_path)
    out = tmp_path / "merged"
    first, second = _run(["merge", recipe(tmp_path, base, paths, "linear"), str(out), "--no-progress"]), \
        _run(["merge", recipe(tmp_path, base, paths, "task_arithmetic"), str(out), "--no-progress"])
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser or "was created by another process" in loser
    winner = "linear" if results[0][0] == 0 else "task_arithmetic"
    want = merge(paths, base, Linear() if winner == "linear" else TaskArithmetic())
    expert = Expert(out)
    assert same({k: expert.tensor(k) for k in expert.names()}, want)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
def test_workers_die_with_a_launcher_killed_as_they_start(tmp_path):
    base, paths = _big_family(tmp_path)
    out = tmp_path / "merged"
    launcher = _run(["merge", recipe(tmp_path, base, paths), str(out), "--nproc", "2", "--no-progress"])
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _children(launcher.pid)
        time.sleep(0.02)
    assert len(workers) == 2, "the launcher started no workers"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    time.sleep(1)
    assert not out.exists()  # nothing was committed by an orphan
    merge(paths, base, Linear(), out=out)  # and the next write tidies what they left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


# -- probes beyond the list -------------------------------------------------------------------------------------------


def test_other_spellings_of_an_input_are_still_the_input(tmp_path, monkeypatch):
    base, paths = family(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    spellings = ["e0.safetensors", "./e0.safetensors", f"{tmp_path}/../{tmp_path.name}/e0.safetensors",
                 "e0.statistics.safetensors", ".", str(tmp_path) + "/", "e0.safetensors/inside.safetensors"]
    os.symlink("e0.safetensors", tmp_path / "alias.safetensors")
    spellings.append("alias.safetensors")
    for out in spellings:
        with pytest.raises((ValueError, ForeignOutput), match="an input of this merge|symbolic link|which is a file") \
                as info:
            merge(paths, base, Linear(), out=out, overwrite=True)
        assert "\n" not in str(info.value)
    assert tree(tmp_path) == {**before, "alias.safetensors": ("link", "e0.safetensors")}


def test_local_only_outputs_refuse_a_url_instead_of_writing_a_folder_named_s3(tmp_path, monkeypatch, capsys):
    base, paths = family(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    url = "s3://AKIAKEY:SUPERSECRET@bucket/out"  # Path() folded it into ./s3:/AKIAKEY:SUPERSECRET@bucket/out
    match = "output 's3://\\*\\*\\*@bucket/out' is a URL, and this output is written to a local path only"
    with pytest.raises(ValueError, match=match):
        tall.compress(paths, base, url)
    with pytest.raises(ValueError, match=match):
        report(paths, base, progress=False).save(url)
    assert cli(["report", *map(str, paths), "--base", str(base), "--out", url, "--no-progress"]) == 2
    assert "is a URL" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    base, paths = family(tmp_path)
    folder = merge(paths, base, Linear(), out=tmp_path / "expert")
    before = tree(folder)
    with pytest.raises(ValueError, match="is inside an input of this merge"):
        merge([folder, *paths], base, Linear(), out=folder / "sub", overwrite=True)
    assert tree(folder) == before


def test_a_checkpoint_output_that_is_a_folder_is_refused(tmp_path):
    base, paths = family(tmp_path)
    (tmp_path / "out.ckpt").mkdir()
    (tmp_path / "out.ckpt" / "keep.txt").write_text("x")
    with pytest.raises(ForeignOutput, match="is a folder lightning-merge did not write"):
        merge(paths, base, Linear(), out=tmp_path / "out.ckpt", overwrite=True)
    (tmp_path / "out.ckpt" / "keep.txt").unlink()
    with pytest.raises(ValueError, match="is a folder, and this output is a file"):
        merge(paths, base, Linear(), out=tmp_path / "out.ckpt", overwrite=True)


def test_a_local_folder_with_the_upload_marker_is_not_loaded(tmp_path):
    base, paths = family(tmp_path)
    folder = merge(paths, base, Linear(), out=tmp_path / "m")
    (folder / INCOMPLETE_NAME).write_text("{}")
    with pytest.raises(IncompleteOutput, match="is incomplete"):
        Expert(folder)


def test_capture_never_deletes_an_adapter_folder_it_did_not_write(tmp_path):
    from lightning_merge.files.outputs import remove_output

    folder = tmp_path / "last.adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"user")
    assert remove_output(folder) is False and (folder / "adapter_model.safetensors").read_bytes() == b"user"
    save_tensors(tmp_path / "x.safetensors", {"w": torch.ones(1)})
    assert remove_output(tmp_path / "x.safetensors") is False and (tmp_path / "x.safetensors").exists()
    write_statistics(tmp_path / "x.statistics.safetensors", {"fisher.example": {"w": torch.ones(1)}},
                     {"fisher.example": {"count": 1}})
    assert remove_output(tmp_path / "x.statistics.safetensors") is True
    assert not (tmp_path / "x.statistics.safetensors").exists()


def test_a_continual_state_is_never_created_inside_a_users_folder(tmp_path, s3):
    from lightning_merge import ContinualState
    from lightning_merge.files.remote import filesystem

    base, _ = family(tmp_path)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("keep")
    with pytest.raises(ForeignOutput, match="proj' holds files and no continual state \\(notes.txt\\)"):
        ContinualState.create(proj, base=base, strategy=Linear())
    assert tree(proj) == {".": "folder", "notes.txt": b"keep"}
    fs, _ = filesystem(s3)
    fs.pipe_file(f"{s3}/proj/notes.txt".split("://", 1)[1], b"keep")
    with pytest.raises(ForeignOutput, match="holds files and no continual state"):
        ContinualState.create(f"{s3}/proj", base=base, strategy=Linear())
    assert list(_objects(f"{s3}/proj").values()) == [b"keep"]
    (tmp_path / "empty").mkdir()
    assert ContinualState.create(tmp_path / "empty", base=base, strategy=Linear()).count == 0
