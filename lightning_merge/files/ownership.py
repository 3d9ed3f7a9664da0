"""What an output of lightning-merge may replace: the one rule every writer follows, local or on object storage.

An output path may be written when nothing is there. When something is there, it may be replaced (``overwrite``,
and the callbacks that rewrite their outputs at every fit) only if it is

- an **earlier output of lightning-merge**, recognised from what the tool wrote into it:
  a folder by its ``lightning_merge.json``, which lists every file the tool wrote there (a folder that also holds
  anything else is not the tool's alone); a ``.safetensors`` file by a ``lightning_merge`` key (or a
  ``lightning-merge/...`` format) in its header's metadata; a ``.ckpt`` by a top-level ``lightning_merge`` key,
  found by walking the opcodes of its pickle without executing them and without reading any tensor data;
- or an **empty folder**.

Anything else (a project folder, a user's file, a symbolic link, a device node, a FIFO) is refused with
:class:`ForeignOutput`, whatever flag is passed. The check runs when the output is planned and again at commit.
"""

from __future__ import annotations

import json
import os
import pickletools
import stat
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from lightning_merge.errors import ForeignOutput, IncompleteOutput

#: The provenance file of every folder output: what made it, and the files it wrote (``files``).
PROVENANCE_NAME = "lightning_merge.json"
#: The key that marks a file as an output of lightning-merge (safetensors ``__metadata__``, a ``.ckpt``'s top level).
OWNER_KEY = "lightning_merge"
#: An object written first and deleted last while a folder output at a URL is uploaded (see :mod:`storage`).
INCOMPLETE_NAME = "lightning_merge.incomplete"

_MAX_RECORD = 16 << 20  # a provenance file or a marker larger than this is not one of ours
_MAX_HEADER = 100 << 20
_MAX_PICKLE = 256 << 20



def incomplete(where: Any) -> IncompleteOutput:
    """The error a reader raises for a folder holding the in-progress marker."""
    return IncompleteOutput(
        f"'{where}' is incomplete: an upload of it is in progress or was interrupted ({INCOMPLETE_NAME} is there), "
        "so it may hold parts of two different outputs; wait for the upload to finish, or write the output again"
    )


def marked(metadata: Mapping[str, str] | None, record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Safetensors metadata carrying the mark of an output of lightning-merge (``record``: what made it)."""
    from lightning_merge._version import __version__

    out = dict(metadata or {})
    full = {"library": "lightning-merge", "version": __version__, **dict(record or {})}
    out.setdefault(OWNER_KEY, json.dumps(full, default=str, sort_keys=True))
    return out


def folder_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` as a relative POSIX path, sorted (the provenance file excluded)."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != PROVENANCE_NAME:
                found.append(rel)
    return sorted(found)


def write_record(folder: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``folder/lightning_merge.json``: ``record`` (``library`` and ``version`` by default) plus ``files``,
    every file now in the folder (call it last, once the folder holds everything it will hold). Returns what was
    written."""
    from lightning_merge._version import __version__

    full = {"library": "lightning-merge", "version": __version__, **dict(record), "files": folder_files(folder)}
    with open(folder / PROVENANCE_NAME, "w") as f:
        json.dump(full, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    return full


def listed_files(record: Any) -> set[str] | None:
    """The files a provenance record (or an upload marker) says the tool wrote, or None when it lists none."""
    if not isinstance(record, dict):
        return None
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


# -- recognising the tool's files --------------------------------------------------------------------------------


def stream_is_ours(f: BinaryIO, size: int) -> bool:
    """Whether the file open in ``f`` (``size`` bytes) is an output of lightning-merge: a safetensors file with the
    mark in its metadata, or a ``torch.save`` zip whose top-level dict has a ``lightning_merge`` key. Never raises
    for what it cannot read (that is simply not ours)."""
    try:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            f.seek(0)
            return _checkpoint_is_ours(f)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        if n < 2 or n > _MAX_HEADER or n > size - 8:
            return False
        header = json.loads(f.read(n))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return isinstance(meta, dict) and (OWNER_KEY in meta or str(meta.get("format", "")).startswith(
            "lightning-merge/"))
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError, RuntimeError):
        return False


def _checkpoint_is_ours(f: BinaryIO) -> bool:
    with zipfile.ZipFile(f) as archive:
        pickles = [i for i in archive.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
        if len(pickles) != 1 or pickles[0].file_size > _MAX_PICKLE:
            return False
        data = archive.read(pickles[0])
    return OWNER_KEY.encode() in data and OWNER_KEY in top_level_keys(data)


_STRINGS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_MARK = object()


def top_level_keys(data: bytes) -> set[str]:
    """The string keys of the dict a pickle holds at its top level, read by walking its opcodes on a model of the
    unpickler's stack (nothing is executed, no class is looked up, no tensor is read)."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    keys: set[str] = set()

    def pop_mark() -> list[Any]:
        i = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[i + 1:]
        del stack[i:]
        return items

    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name == "STOP":
            break
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            items = pop_mark() if name != "SETITEM" else [stack.pop(-2), stack.pop()]
            if name == "DICT":
                stack.append(None)
            if len(stack) == 1:  # the dict filled (or built) is the pickle's top-level object
                keys.update(k for k in items[0::2] if isinstance(k, str))
        else:
            before, after = opcode.stack_before, opcode.stack_after
            if pickletools.markobject in before:
                extra = before.index(pickletools.markobject)
                pop_mark()
                del stack[len(stack) - extra:]
            elif before:
                del stack[max(0, len(stack) - len(before)):]
            for item in after:
                if item is pickletools.markobject:
                    stack.append(_MARK)
                else:
                    stack.append(arg if name in _STRINGS and isinstance(arg, str) else None)
    return keys


# -- the rule ------------------------------------------------------------------------------------------------------


def _sample(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def folder_reason(names: set[str], read: Callable[[str], bytes | None]) -> str | None:
    """Why a folder holding files ``names`` (relative POSIX paths) is not an output of lightning-merge (None when
    it is one, or empty). ``read(name)`` returns a small file's bytes (None if it cannot)."""
    if not names:
        return None
    allowed: set[str] = {PROVENANCE_NAME}
    record = _read_json(read, PROVENANCE_NAME) if PROVENANCE_NAME in names else None
    listed = listed_files(record)
    if INCOMPLETE_NAME in names:  # an upload that was interrupted: the files it may have left
        allowed.add(INCOMPLETE_NAME)
        allowed |= listed_files(_read_json(read, INCOMPLETE_NAME)) or set()
    if listed is not None:
        allowed |= listed
    elif PROVENANCE_NAME in names and INCOMPLETE_NAME not in names:
        return (f"holds a {PROVENANCE_NAME} that lists no files (an output of an earlier lightning-merge, or not one "
                "at all), so which files are the tool's cannot be known")
    foreign = names - allowed
    if not foreign:
        return None
    if PROVENANCE_NAME not in names and INCOMPLETE_NAME not in names:
        return _not_ours(foreign)
    return f"holds files lightning-merge did not write ({_sample(foreign)}: not in its {PROVENANCE_NAME})"


def _not_ours(names: Iterable[str]) -> str:
    return f"is a folder lightning-merge did not write (it holds {_sample(names)} and no {PROVENANCE_NAME})"


def _read_json(read: Callable[[str], bytes | None], name: str) -> Any:
    try:
        data = read(name)
        return json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def local_reason(target: str | os.PathLike) -> str | None:
    """Why the existing ``target`` is not a replaceable output (None: nothing there, an earlier output of
    lightning-merge, or an empty folder). Never follows a link, never opens a device or a FIFO."""
    target = Path(target)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be inspected ({err.strerror or err})"
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return f"is a symbolic link (to '{os.readlink(target)}'), and lightning-merge writes no links"
    if stat.S_ISREG(mode):
        try:
            with open(target, "rb") as f:
                ours = stream_is_ours(f, info.st_size)
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
        return None if ours else "is a file lightning-merge did not write (its metadata has no lightning_merge mark)"
    if not stat.S_ISDIR(mode):
        return f"is a {_kind(mode)}"
    top = os.listdir(target)
    if not top:
        return None
    if PROVENANCE_NAME not in top and INCOMPLETE_NAME not in top:  # no need to walk a project folder: not ours
        return _not_ours(n + "/" if (target / n).is_dir() and not (target / n).is_symlink() else n for n in top)
    names: set[str] = set()
    for root, dirs, files in os.walk(target):
        for entry in [*dirs, *files]:
            path = Path(root) / entry
            rel = path.relative_to(target).as_posix()
            entry_mode = os.lstat(path).st_mode
            if stat.S_ISLNK(entry_mode) or not (stat.S_ISDIR(entry_mode) or stat.S_ISREG(entry_mode)):
                kind = "symbolic link" if stat.S_ISLNK(entry_mode) else _kind(entry_mode)
                return f"holds a {kind} ('{rel}'), which lightning-merge never writes"
            if stat.S_ISREG(entry_mode):
                names.add(rel)
        if not files and not dirs and Path(root) != target:
            names.add(Path(root).relative_to(target).as_posix() + "/")  # an empty sub-folder is not the tool's

    def read(name: str) -> bytes | None:
        path = target / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_RECORD:
            return None
        return path.read_bytes()

    return folder_reason(names, read)


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def remote_reason(fs: Any, path: str) -> str | None:
    """:func:`local_reason` for the object or folder ``path`` of the fsspec filesystem ``fs``."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        prefix = path.rstrip("/") + "/"
        top = {e["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if e.get("type") == "directory" else "")
               for e in fs.ls(path, detail=True)}
        if top and PROVENANCE_NAME not in top and INCOMPLETE_NAME not in top:
            return _not_ours(top)
        names = {p[len(prefix):] for p in fs.find(path) if p.startswith(prefix) and len(p) > len(prefix)}

        def read(name: str) -> bytes | None:
            data = fs.cat_file(prefix + name)
            return data if len(data) <= _MAX_RECORD else None

        return folder_reason(names, read)
    with fs.open(path, "rb", block_size=1 << 16) as f:  # the header only: never the whole object
        ours = stream_is_ours(f, int(info.get("size") or 0))
    return None if ours else "is an object lightning-merge did not write (its metadata has no lightning_merge mark)"


def refusal(target: Any, reason: str) -> ForeignOutput:
    """The error for an output that must not be replaced (``target`` as the user named it, ``reason`` from the
    checks above)."""
    return ForeignOutput(
        f"output '{target}' {reason}: lightning-merge replaces only its own earlier outputs and empty folders, "
        "whatever overwrite says; choose another path, or move it away yourself"
    )


def refuse_foreign(target: str | os.PathLike, shown: Any = None) -> None:
    """Raise :class:`ForeignOutput` unless the local ``target`` may be replaced by an output (see the module)."""
    reason = local_reason(target)
    if reason is not None:
        raise refusal(shown if shown is not None else target, reason)


__all__ = [
    "INCOMPLETE_NAME",
    "OWNER_KEY",
    "PROVENANCE_NAME",
    "ForeignOutput",
    "IncompleteOutput",
    "incomplete",
    "folder_files",
    "folder_reason",
    "listed_files",
    "local_reason",
    "marked",
    "refuse_foreign",
    "refusal",
    "remote_reason",
    "stream_is_ours",
    "top_level_keys",
    "write_record",
]
