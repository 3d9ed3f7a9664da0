"""Durable writes: a temporary sibling, fsync, then an atomic rename (or exchange). A crash at any point leaves
either the previous output or the new one, never a half-written output that looks complete, and never nothing.

Temporary siblings are named ``.NAME.partial-PID-RANDOM`` (being written) and ``.NAME.old-PID-RANDOM`` (a previous
output moved aside); :func:`cleanup_stale` removes those whose process is gone and restores a previous output that a
crash left aside.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_merge.errors import OutputError

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first), then ``root`` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def partial_path(target: Path) -> Path:
    """A unique hidden sibling of ``target`` to write into before the final rename (names this process)."""
    return _sibling(Path(target), "partial")


def _owner_alive(item: Path) -> bool:
    """Whether the process that named a ``.partial-PID-…`` / ``.old-PID-…`` sibling is still running."""
    try:
        pid = int(item.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False  # an older naming scheme without a pid: nobody owns it any more
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def cleanup_stale(target: str | os.PathLike) -> None:
    """Tidy what crashed writes of ``target`` left: restore a previous output moved aside when ``target`` is gone,
    and delete abandoned ``.partial`` / ``.old`` siblings (those of processes that are still running are kept)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    stale = [
        p
        for kind in ("partial", "old")
        for p in target.parent.glob(f".{_glob_escape(target.name)}.{kind}-*")
        if not _owner_alive(p)
    ]
    olds = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    if olds and not os.path.lexists(target):
        os.replace(olds[-1], target)  # a crash between moving the old output aside and moving the new one in
        fsync_dir(target.parent)
        stale.remove(olds[-1])
    for item in stale:
        _remove(item)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


REPLACE_MODES = ("always", "own", "never")


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (``"a named pipe (FIFO)"``, a
    device, a socket): reading one can block forever or never end. None otherwise (symbolic links are followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"



# errors only a write can cause: when one carries no file name (os.pwrite, os.fsync), it is the output's
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_ADVICE = {
    errno.ENOSPC: "the filesystem is full: free space there, or write elsewhere",
    errno.EDQUOT: "the disk quota is reached: free space there, or write elsewhere",
    errno.EFBIG: "the file is larger than that filesystem allows: write elsewhere (or use a smaller shard size)",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "no permission to write there: choose a path you can write, or fix the folder's permissions",
    errno.EPERM: "the operation is not permitted there: choose a path you can write, or fix the folder's permissions",
}


def _concerns(filename: Any, target: Path) -> bool:
    """Whether a path an error names is ``target``, a folder above it, something inside it, or one of its
    temporary siblings (``.NAME.partial-…``, ``.NAME.old-…``)."""
    path = Path(os.fsdecode(filename)).absolute()
    target = target.absolute()
    if path == target or path in target.parents or target in path.parents:
        return True
    sibling = f".{target.name}."
    return any(p.parent == target.parent and p.name.startswith(sibling) for p in (path, *path.parents))


def output_error(target: str | os.PathLike, err: BaseException) -> OutputError | None:
    """The clear error for a failed write of ``target``: an ``OSError`` a write caused (one naming ``target`` or a
    path of its, or a full / read-only filesystem), or ``torch.save``'s "[enforce fail at inline_container.cc]"; None
    for anything else (an input that cannot be read keeps its own message)."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, OSError) and err.errno is not None:
        if err.filename is not None and not _concerns(err.filename, Path(target)):
            return None
        if err.filename is None and err.errno not in _WRITE_ERRNOS:
            return None
        reason = err.strerror or os.strerror(err.errno)
        advice = _ADVICE.get(err.errno)
        where = f" (at '{err.filename}')" if err.filename is not None and \
            Path(os.fsdecode(err.filename)).absolute() in Path(target).absolute().parents else ""
        text = f"cannot write '{target}'{where}: {reason}" + (f"; {advice}" if advice else "")
        return OutputError(err.errno, text + "; nothing was replaced")
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        detail = str(err).split("]", 1)[-1].strip(" .")
        return OutputError(errno.EIO, f"cannot write '{target}': torch.save failed ({detail}); the filesystem is "
                                      "full, read-only or not writable by you: free space or write elsewhere; "
                                      "nothing was replaced")
    return None


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``target`` into an :class:`OutputError` that names it and says what to do (see
    :func:`output_error`); every other error passes through unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        clear = output_error(target, err)
        if clear is None or clear is err:
            raise
        raise clear from err


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, replace: str = "always") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and move it to ``target`` (see :func:`commit`
    for ``replace``).

    On an exception the temporary file is removed and ``target`` is left as it was; a write the filesystem refuses
    is an :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    _check_mode(replace)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        cleanup_stale(target)
        tmp = partial_path(target)
        try:
            yield tmp
            fsync_file(tmp)
            commit(tmp, target, replace=replace)
        finally:
            if tmp.exists():
                tmp.unlink()


def _check_mode(replace: str) -> None:
    if replace not in REPLACE_MODES:
        raise ValueError(f"replace must be one of {', '.join(REPLACE_MODES)}, got {replace!r}")


def commit(tmp: Path, target: Path, *, replace: str = "always") -> None:
    """Move a finished ``tmp`` (file or folder, already fsync'd) to ``target``: the commit point of every output.

    Args:
        tmp: the temporary sibling written.
        target: where it goes.
        replace: what may be at ``target`` now. ``"never"``: nothing (a new output; if another process created
            ``target`` meanwhile, :class:`FileExistsError` and nothing of it is touched: the check holds at the
            commit itself, by ``renameat2(RENAME_NOREPLACE)`` or a hard link where the OS has no such rename).
            ``"own"``: an earlier output of lightning-merge or an empty folder (checked again here, see
            :mod:`lightning_merge.files.ownership`), replaced as :func:`replace_dir` does. ``"always"``: anything (the
            tool's internal files: caches, pointers).
    """
    _check_mode(replace)
    if replace == "never":
        if tmp.is_dir():
            fsync_dir(tmp)
        _rename_noreplace(tmp, target)
        fsync_dir(target.parent)
        return
    if replace == "own":
        from lightning_merge.files.ownership import refuse_foreign

        refuse_foreign(target)
    if tmp.is_dir():
        replace_dir(tmp, target)
    else:
        os.replace(tmp, target)  # one atomic step for a file
        fsync_dir(target.parent)


def _created_meanwhile(target: Path) -> FileExistsError:
    return FileExistsError(
        f"output '{target}' was created by another process while this one was writing it; it was left as it is and "
        "this result was discarded: choose another path, or pass overwrite=True (CLI: --overwrite) to replace it"
    )


def _rename_noreplace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` only if nothing is at ``target``, atomically where the OS can."""
    libc = _libc()
    if libc is not None:
        if libc.renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise _created_meanwhile(target)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(target))
    if not tmp.is_dir():  # a hard link is created only where nothing is: the same guarantee for a file
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise _created_meanwhile(target) from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            os.unlink(tmp)
            return
    # No atomic way here: check, then rename (a folder never replaces a file nor a non-empty folder; at worst an
    # empty folder created in between is replaced, which loses nothing).
    if os.path.lexists(target):
        raise _created_meanwhile(target)
    try:
        os.rename(tmp, target)
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        raise _created_meanwhile(target) from err
    except OSError as err:
        if err.errno == errno.ENOTEMPTY:
            raise _created_meanwhile(target) from err
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or filesystem cannot."""
    libc = _libc()
    if libc is None:
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _LIBC.append(libc if hasattr(libc, "renameat2") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` (folder or file, already fsync'd) to ``target``, replacing an existing ``target``.

    Where the OS can, the two are exchanged in one atomic step; elsewhere the old output is moved aside first, and a
    crash between the two renames is undone by the next :func:`cleanup_stale` of ``target``. Either way, at every
    instant ``target`` holds the old output or the new one.
    """
    if tmp.is_dir():
        fsync_dir(tmp)
    if os.path.lexists(target):
        if _exchange(tmp, target):
            fsync_dir(target.parent)
            _remove(tmp)  # now the old output
            return
        old = _sibling(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        _remove(old)
        return
    os.replace(tmp, target)
    fsync_dir(target.parent)


__all__ = [
    "REPLACE_MODES",
    "OutputError",
    "atomic_file",
    "cleanup_stale",
    "commit",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "output_error",
    "partial_path",
    "replace_dir",
    "special_file_kind",
    "writing",
]
