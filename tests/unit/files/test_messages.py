"""Issue 27, item 13: every bad input and refused write is one clear message that names the file, tensor or argument
and says what to do, and nothing hangs.

Each case failed before its fix: a hang (a FIFO as an expert), a raw message (``[Errno 28] No space left on device``,
``[enforce fail at inline_container.cc:747]``, ``AttributeError: 'list' object has no attribute ...``,
``KeyError: torch.complex64``, an invalid regular expression's ``re.error``), a silent misreading (``use_rslora:
"false"`` read as true, a checkpoint's weights under ``model`` read as no tensor), or an error line of 300,000
characters. ``test_the_table_is_what_the_note_reports`` counts the table.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line, recipe
from conftest import family as _family

from lightning_merge import ContinualState, Expert, Linear, Ties, merge
from lightning_merge.cli.commands import main as cli
from lightning_merge.continual.state import ContinualError
from lightning_merge.files.atomic import OutputError
from lightning_merge.files.safetensors import load_tensors, save_tensors
from lightning_merge.formats.lora import AdapterError
from lightning_merge.tools.recipe import RecipeError, load_recipe

family = functools.partial(_family, stats=False)  # experts without sidecars

# -- the table: (name, fn(tmp_path), error class, what the message must say) ---------------------------------------


def _adapter(t: Path, config: dict, tensors: dict | None = None, base: dict | None = None, **kwargs) -> Expert:
    (t / "base").mkdir()
    save_tensors(t / "base" / "model.safetensors", base or {"layer.weight": torch.zeros(4, 6)})
    folder = t / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    tensors = tensors or {"base_model.model.layer.lora_A.weight": torch.ones(2, 6),
                          "base_model.model.layer.lora_B.weight": torch.ones(4, 2)}
    save_tensors(folder / "adapter_model.safetensors", tensors)
    return Expert(folder, base=t / "base", **kwargs)


def _adapter_bad_regex(t):
    return _adapter(t, {"r": 2, "lora_alpha": 2, "alpha_pattern": {"lay(er": 4}})


def _adapter_alpha_abc(t):
    return _adapter(t, {"r": 2, "lora_alpha": "abc"})


def _adapter_rank_zero(t):
    return _adapter(t, {"lora_alpha": 2}, tensors={"base_model.model.layer.lora_A.weight": torch.ones(0, 6),
                                                   "base_model.model.layer.lora_B.weight": torch.ones(4, 0)})


def _adapter_target_matches_two(t):
    return _adapter(t, {"r": 2, "lora_alpha": 2},
                    base={"a.layer.weight": torch.zeros(4, 6), "b.layer.weight": torch.zeros(4, 6)})


def _adapter_rslora_string(t):
    return _adapter(t, {"r": 2, "lora_alpha": 2, "use_rslora": "false"})


def _state(t: Path) -> Path:
    base, paths = family(t)
    ContinualState.create(t / "state", base=base, strategy=Linear()).add(paths[0])
    return t / "state"


def _edit(path: Path, fn: Callable) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _continual_tensors_a_list(t):
    state = _state(t)
    _edit(state / "state.json", lambda d: {**d, "tensors": ["w", "b"]})
    return ContinualState(state).add(t / "e1.safetensors")


def _continual_meta_a_list(t):
    state = _state(t)
    (state / "current" / "meta.json").write_text("[]")
    return ContinualState(state).describe()


def _continual_journal_entry_a_string(t):
    state = _state(t)
    _edit(state / "current" / "meta.json", lambda d: {**d, "journal": ["x"]})
    return ContinualState(state).describe()


def _continual_count_disagrees(t):
    state = _state(t)
    _edit(state / "current" / "meta.json", lambda d: {**d, "count": 5})
    return ContinualState(state).add(t / "e1.safetensors")


def _complex_buffer_that_differs(t):
    a = {"w": torch.ones(2), "freqs": torch.ones(2, dtype=torch.complex64)}
    b = {"w": torch.zeros(2), "freqs": torch.full((2,), 1j, dtype=torch.complex64)}
    return merge([a, b], None, Linear(), t / "out.safetensors")


def _sparse_tensor_in_a_checkpoint(t):
    torch.save({"state_dict": {"w": torch.eye(3).to_sparse()}}, t / "m.ckpt")
    return Expert(t / "m.ckpt")


def _complex128_written_to_safetensors(t):
    return save_tensors(t / "x.safetensors", {"w": torch.zeros(2, dtype=torch.complex128)})


def _checkpoint_with_two_weight_entries(t):
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}, "epoch": 1}, t / "m.ckpt")
    return Expert(t / "m.ckpt")


def _checkpoint_without_tensors(t):
    torch.save({"epoch": 3, "note": "no weights"}, t / "m.ckpt")
    return Expert(t / "m.ckpt")


def _yaml_bomb(t):
    base, paths = family(t)
    nest = "&e [1,1,1,1,1,1,1,1,1,1]"
    for name in "dcba":
        nest = f"&{name} [{nest}" + f",*{chr(ord(name) + 1)}" * 9 + "]"
    (t / "bomb.yaml").write_text(f"merge_method: ties\nbase_model: {base}\nparameters:\n  lambda: {nest}\nmodels:\n"
                                 + "".join(f"  - model: {p}\n    parameters: {{weight: 1, density: 0.5}}\n"
                                           for p in paths))
    return load_recipe(t / "bomb.yaml")


def _yaml_alias_inside_itself(t):
    base, paths = family(t)
    (t / "loop.yaml").write_text(f"merge_method: ties\nbase_model: {base}\nparameters:\n  density: &a [0.5, *a]\n"
                                 f"models:\n  - model: {paths[0]}\n    parameters: {{weight: 1}}\n")
    return load_recipe(t / "loop.yaml")


def _strategy_argument_of_a_huge_value(t):
    value: list = [1.0] * 10
    for _ in range(6):
        value = [value] * 10  # a million numbers, as YAML aliases make them: the message shows a few
    return Ties(density=value)


def _recipe_not_utf8(t):
    (t / "r.yaml").write_bytes(b"merge_method: linear\xff\xfe\n")
    return load_recipe(t / "r.yaml")


def _sidecar_metadata_huge_value(t):
    from lightning_merge.formats.sidecar import Statistics

    kinds = json.dumps({"gram": {"form": [["full"] * 1000] * 1000, "count": 4}})
    save_tensors(t / "s.statistics.safetensors", {"gram/w": torch.eye(2)},
                 {"format": "lightning-merge/statistics", "format_version": "1", "kinds": kinds})
    return Statistics.load(t / "s.statistics.safetensors")


CASES: list[tuple[str, Callable, type, str]] = [
    ("adapter: alpha_pattern is not a regular expression", _adapter_bad_regex, AdapterError,
     "adapter'.*alpha_pattern key 'lay\\(er' is not a regular expression"),
    ("adapter: lora_alpha 'abc'", _adapter_alpha_abc, AdapterError,
     "adapter'.*lora_alpha = 'abc'; it must be a finite"),
    ("adapter: factors of rank 0", _adapter_rank_zero, AdapterError, "module 'layer' has lora_A of shape \\[0, 6\\]"),
    ("adapter: a target matching two modules", _adapter_target_matches_two, AdapterError,
     "'layer.weight' matches 2 tensors of the base \\('a.layer.weight', 'b.layer.weight'\\)"),
    ("adapter: use_rslora 'false' (was read as true)", _adapter_rslora_string, AdapterError,
     "use_rslora = 'false'; it must be true or false"),
    ("continual: state.json tensors is a list", _continual_tensors_a_list, ContinualError,
     "state.json': 'tensors' is not an object of tensor names and shapes; the state is damaged"),
    ("continual: meta.json is a list", _continual_meta_a_list, ContinualError,
     "meta.json': a list, not an object; the state is damaged"),
    ("continual: a journal entry is a string", _continual_journal_entry_a_string, ContinualError,
     "meta.json': its journal is not a list of 1 entries with order, name, path, checksum and time"),
    ("continual: count disagrees with the journal", _continual_count_disagrees, ContinualError,
     "meta.json': 'norms' is not a list of 5 numbers"),
    ("dtype: a complex buffer that differs", _complex_buffer_that_differs, ValueError,
     "complex tensor 'freqs' differs between"),
    ("dtype: a sparse tensor in a .ckpt", _sparse_tensor_in_a_checkpoint, ValueError,
     "m.ckpt': tensor 'w' is a sparse_coo tensor; .*to_dense"),
    ("dtype: complex128 to safetensors", _complex128_written_to_safetensors, ValueError,
     "tensor 'w' has dtype complex128, which a safetensors file cannot hold"),
    (".ckpt: weights under 'model' and 'ema'", _checkpoint_with_two_weight_entries, ValueError,
     "m.ckpt' has no 'state_dict' and holds weights under several entries \\('model', 'ema'\\).*prefix='model.'"),
    (".ckpt: no tensor at all", _checkpoint_without_tensors, ValueError, "m.ckpt' holds no tensors.*'epoch', 'note'"),
    ("recipe: YAML aliases expanding to 10^5 values", _yaml_bomb, RecipeError,
     "bomb.yaml: the recipe at parameters.lambda expands to more than 100,000 values"),
    ("recipe: a YAML alias inside its own anchor", _yaml_alias_inside_itself, RecipeError,
     "loop.yaml: the recipe at parameters.density contains itself"),
    ("recipe: not UTF-8", _recipe_not_utf8, RecipeError, "recipe '.*r.yaml' is not UTF-8 text"),
    ("statistics: a metadata value of a million strings is shown short", _sidecar_metadata_huge_value, ValueError,
     "s.statistics.safetensors: metadata gram.form = \\[\\['full', 'full'"),
    ("strategy: a million-number argument is shown short", _strategy_argument_of_a_huge_value, ValueError,
     "Ties.density must be a number or a list of numbers, got \\[\\[\\[\\["),
]


@pytest.mark.parametrize("name,fn,cls,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(tmp_path, name, fn, cls, match):
    with pytest.raises(cls, match=match) as info:
        fn(tmp_path)
    message = str(info.value)
    assert "\n" not in message.strip() and len(message) < 600, message


def test_the_table_is_what_the_note_reports():
    assert len(CASES) == 19


# -- writes the filesystem refuses (item 13) -------------------------------------------------------------------------


def test_a_recipe_nested_thousands_deep_is_one_line_naming_it(tmp_path, capsys):
    base, paths = family(tmp_path)
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {paths[0]}\n"
                    "    parameters: {weight: " + "[" * 5000 + "1" + "]" * 5000 + "}\n")
    with pytest.raises(RecipeError, match=f"recipe '{re.escape(str(deep))}' nests lists or mappings too deeply"):
        load_recipe(deep)
    assert cli(["merge", str(deep), str(tmp_path / "out")]) == 2
    assert "nests lists or mappings too deeply" in one_line(capsys) and not (tmp_path / "out").exists()


def test_a_full_disk_names_the_output_and_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    base, paths = family(tmp_path)
    merge(paths, base, Linear(), tmp_path / "out")
    before = load_tensors(tmp_path / "out" / "model.safetensors")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match=f"cannot write '{re.escape(str(tmp_path / 'out'))}': No space left on "
                                          "device; the filesystem is full: free space there") as info:
        merge(paths, base, Ties(), tmp_path / "out", overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial output left
    after = load_tensors(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cli(["merge", str(recipe(tmp_path, paths)), str(tmp_path / "o.safetensors")]) == 2
    assert one_line(capsys).endswith(f"cannot write '{tmp_path / 'o.safetensors'}': No space left on device; the "
                                     "filesystem is full: free space there, or write elsewhere; nothing was replaced")


def test_a_full_disk_during_a_continual_add_names_the_state_and_keeps_it(tmp_path, monkeypatch):
    base, paths = family(tmp_path)
    state = ContinualState.create(tmp_path / "state", base=base, strategy=Linear())
    state.add(paths[0])

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(OutputError, match=f"cannot write '{re.escape(str(tmp_path / 'state'))}': No space left"):
            state.add(paths[1])
    assert ContinualState(tmp_path / "state").count == 1
    assert [p.name for p in (tmp_path / "state" / "generations").iterdir()] == ["000001"]
    state.add(paths[1])  # space again: the add goes through
    assert state.count == 2


def test_a_full_disk_under_a_report_names_its_folder(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lightning_merge.tools.diagnostics import report

    base, paths = family(tmp_path)
    result = report(paths, base, progress=False)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=f"cannot write '{re.escape(str(tmp_path / 'report'))}': No space left"):
        result.save(tmp_path / "report")
    assert not (tmp_path / "report").exists() and list(tmp_path.glob(".report*")) == []


def test_a_full_disk_under_tall_compression_names_its_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from lightning_merge.tools import tall

    base, paths = family(tmp_path)
    earlier = tall.compress(paths, base, tmp_path / "t")
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    for out, overwrite in ((tmp_path / "t", True), (tmp_path / "new", False)):
        with pytest.raises(OutputError, match=f"cannot write '{re.escape(str(out))}': No space left on device; the "
                                              "filesystem is full: free space there, or write elsewhere"):
            tall.compress(paths, base, out, tall_lambda=0.2, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == before
    assert tall.TallCompressed(tmp_path / "t").tall_lambda == earlier.tall_lambda == [0.6, 0.6]


def test_a_full_disk_under_torch_save_names_the_checkpoint(tmp_path, monkeypatch):
    base, paths = family(tmp_path)

    class Full:
        def __init__(self, *args, **kwargs):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("lightning_merge.files.torch_load.open", Full, raising=False)
    with pytest.raises(OutputError, match=f"cannot write '{re.escape(str(tmp_path / 'm.ckpt'))}': No space left"):
        merge(paths, base, Linear(), tmp_path / "m.ckpt")
    assert list(tmp_path.glob(".m.ckpt*")) == [] and not (tmp_path / "m.ckpt").exists()


def test_torch_save_s_enforce_failure_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    """What EACCES on a .ckpt output looked like: torch's C++ writer failing to open the file."""
    base, paths = family(tmp_path)

    def refused(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Permission "
                           "denied")

    monkeypatch.setattr(torch, "save", refused)
    out = tmp_path / "m.ckpt"
    assert cli(["merge", str(recipe(tmp_path, paths)), str(out)]) == 2
    line = one_line(capsys)
    assert f"cannot write '{out}': torch.save failed (open file failed with strerror: Permission denied)" in line
    assert "inline_container" not in line and "RuntimeError" not in line


def test_an_unreadable_input_keeps_its_own_message(tmp_path, monkeypatch):
    """Only the output's errors are renamed: a read error of an input names the input, as before."""
    from lightning_merge.files.atomic import output_error

    err = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "e0.safetensors"))
    assert output_error(tmp_path / "out", err) is None
    assert output_error(tmp_path / "out", OSError(errno.EIO, "Input/output error")) is None
    named = output_error(tmp_path / "out", PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out")))
    assert named is not None and "no permission to write there" in str(named)
    inside = output_error(tmp_path / "out", OSError(errno.EROFS, "Read-only file system",
                                                    str(tmp_path / ".out.partial-1-abcd" / "model.safetensors")))
    assert inside is not None and str(inside).startswith(f"cannot write '{tmp_path / 'out'}': Read-only file system")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ""])
def test_a_file_size_limit_is_one_line_naming_the_output(tmp_path, suffix):
    """A real refusal by the kernel (RLIMIT_FSIZE: EFBIG), through torch.save's C++ writer and through pwrite."""
    base, paths = family(tmp_path, shape=(256, 256))
    out = tmp_path / f"merged{suffix}"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
            "from lightning_merge.cli.commands import main; "
            f"sys.exit(main(['merge', {str(recipe(tmp_path, paths))!r}, {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0] == f"lightning-merge: error: cannot write '{out}': File too large; the file is larger than that " \
                       "filesystem allows: write elsewhere (or use a smaller shard size); nothing was replaced"
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []


# -- inputs that are no files, and tensors the formats hold (item 13) ----------------------------------------------


def _unblock_after(fifo: Path, seconds: float = 3.0) -> threading.Thread:
    """Before the fix a reader of the FIFO blocked forever; this opens its other end when someone reads (and gives
    up after ``seconds``), so the unfixed code fails instead of hanging the suite."""

    def run() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("layout", ["file", "shard in a folder", "sidecar"])
def test_a_fifo_is_refused_before_it_is_opened(tmp_path, layout, capsys):
    if layout == "file":
        target = fifo = tmp_path / "e.safetensors"
    elif layout == "shard in a folder":
        (tmp_path / "e").mkdir()
        target, fifo = tmp_path / "e", tmp_path / "e" / "model.safetensors"
    else:
        save_tensors(tmp_path / "e.safetensors", {"w": torch.zeros(2)})
        target, fifo = tmp_path / "e.safetensors", tmp_path / "e.statistics.safetensors"
    os.mkfifo(fifo)
    _unblock_after(fifo)
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"'{re.escape(str(fifo))}' is a named pipe \\(FIFO\\), not a"):
        Expert(target)
    assert time.monotonic() - started < 1.0
    (tmp_path / "r").mkdir()
    assert cli(["merge", str(recipe(tmp_path / "r", [target, target])), str(tmp_path / "out")]) == 2
    assert "is a named pipe (FIFO)" in one_line(capsys)


def test_a_device_is_no_expert():
    with pytest.raises(ValueError, match="expert '/dev/zero' is a device, not a model file or folder"):
        Expert("/dev/zero")


def test_complex_and_unsigned_tensors_round_trip_through_safetensors(tmp_path):
    """Dtypes the safetensors format holds (C64, U16, U32, U64) are read and written: a merge copies them when
    every model holds the same (as any non-floating tensor)."""
    extra = {"freqs": torch.polar(torch.ones(3), torch.arange(3.0)).to(torch.complex64),
             "u16": torch.arange(4).to(torch.uint16), "u32": torch.arange(4).to(torch.uint32),
             "u64": torch.arange(4).to(torch.uint64)}
    a = {"w": torch.ones(2), **extra}
    b = {"w": torch.zeros(2), **extra}
    out = merge([a, b], None, Linear(), tmp_path / "out.safetensors")
    back = load_tensors(out)
    assert torch.equal(back["w"], torch.full((2,), 0.5))
    for key, value in extra.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    torch.save({"state_dict": a}, tmp_path / "a.ckpt")
    assert torch.equal(Expert(tmp_path / "a.ckpt").tensor("freqs"), extra["freqs"])


def test_a_checkpoint_with_its_weights_under_model_is_read(tmp_path):
    base, _ = family(tmp_path)
    b = load_tensors(base)
    torch.save({"model": {k: v + 1 for k, v in b.items()}, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 3}, tmp_path / "e0.ckpt")
    torch.save({"model": {k: v + 3 for k, v in b.items()}, "epoch": 3}, tmp_path / "e1.ckpt")
    merged = merge([tmp_path / "e0.ckpt", tmp_path / "e1.ckpt"], base, Linear())
    for key, value in b.items():
        torch.testing.assert_close(merged[key], value + 2)
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, tmp_path / "two.ckpt")
    assert torch.equal(Expert(tmp_path / "two.ckpt", prefix="ema.").tensor("w"), torch.zeros(2))


def test_values_in_command_line_errors_are_cut_short(tmp_path, capsys):
    base, paths = family(tmp_path)
    nest = "&e [1,1,1,1,1,1,1,1,1,1]"
    for name in "dcb":  # 10,000 numbers: under the expansion limit, so the strategy's own check answers
        nest = f"&{name} [{nest}" + f",*{chr(ord(name) + 1)}" * 9 + "]"
    assert cli(["merge", str(recipe(tmp_path, paths)), str(tmp_path / "o"), "--set", f"weights={nest}"]) == 2
    line = one_line(capsys)
    assert "Linear.weights must be a number or a list of numbers, got [[[[...], [...]," in line
    assert len(line) < 600, len(line)
    nest = f"&a [{nest}" + ",*b" * 9 + "]"  # 100,000: refused as a value no merge takes
    assert cli(["merge", str(recipe(tmp_path, paths)), str(tmp_path / "o"), "--set", f"weights={nest}"]) == 2
    assert "--set at weights expands to more than 100,000 values" in one_line(capsys)
    from lightning_merge.cli.commands import MAX_MESSAGE, _one_line

    text = _one_line(ValueError("x" * 50_000))
    assert len(text) < MAX_MESSAGE + 60 and text.endswith("(cut: 50,000 characters)")


def test_trust_checkpoint_reaches_adapter_model_bin(tmp_path):
    """The refusal of an adapter_model.bin holding an object asks for trust_checkpoint=True; it was then ignored."""
    (tmp_path / "base").mkdir()
    save_tensors(tmp_path / "base" / "model.safetensors", {"layer.weight": torch.zeros(4, 6)})
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    weights = {"base_model.model.layer.lora_A.weight": torch.ones(2, 6),
               "base_model.model.layer.lora_B.weight": torch.ones(4, 2)}
    torch.save(collections.defaultdict(list, weights), folder / "adapter_model.bin")  # a class the safe load refuses
    with pytest.raises(ValueError, match="adapter_model.bin' holds collections.defaultdict .*trust_checkpoint=True"):
        Expert(folder, base=tmp_path / "base")
    expert = Expert(folder, base=tmp_path / "base", trust_checkpoint=True)
    torch.testing.assert_close(expert.tensor("layer.weight"), torch.full((4, 6), 2.0))  # ΔW = (2/2)·B A: 2 per entry


def test_adapter_configs_as_peft_writes_them_still_read(tmp_path):
    """The checks accept what PEFT writes: patterns of escaped module names, null lists, booleans."""
    expert = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "alpha_pattern": {re.escape("layer"): 2},
                                 "rank_pattern": {}, "use_rslora": False, "fan_in_fan_out": False,
                                 "target_modules": None})
    torch.testing.assert_close(expert.tensor("layer.weight"), torch.full((4, 6), 2.0))  # α from the pattern: 2/2


