"""The checks every output path goes through before any work (local paths and object-storage URLs alike): the
ownership rule (:mod:`lightning_merge.files.ownership`), ``overwrite``, and "the output is none of the inputs".
The same rule holds again at the commit (:func:`lightning_merge.files.atomic.commit`,
:func:`lightning_merge.files.remote.upload`)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_merge.files.atomic import cleanup_stale
from lightning_merge.files.ownership import local_reason, refuse_foreign, remote_reason
from lightning_merge.files.remote import filesystem, is_url, redact, refuse_existing, remove, same_location


def check_output(out: str | os.PathLike, overwrite: bool, *, inputs: Sequence[Any] = (),
                 folder: bool | None = None) -> None:
    """:func:`check_output_path` for a local path, or the same checks for an object-storage URL.

    Args:
        out: the output path or URL.
        overwrite: an earlier output of lightning-merge there may be replaced.
        inputs: every path and URL read to make the output.
        folder: True when the output is a folder, False when it is a file (None: either).
    """
    if is_url(out):
        check_not_an_input(str(out), inputs)
        refuse_existing(str(out), overwrite)
    else:
        check_output_path(Path(out), overwrite, inputs=inputs, folder=folder)


def check_not_an_input(out: str | os.PathLike, inputs: Sequence[Any]) -> None:
    """Refuse an output that is one of ``inputs``, holds one (a folder over an input) or lies inside an input
    folder. Local paths are compared resolved (relative or absolute spellings, links, trailing slashes), URLs by
    location (trailing or doubled slashes, credentials and query strings aside).

    Raises:
        ValueError: naming the output and the input.
    """
    for source in inputs:
        if source is None:
            continue
        if is_url(out) or is_url(source):
            how = same_location(str(out), str(source)) if is_url(out) and is_url(source) else None
        else:
            try:
                src, resolved = Path(source).resolve(), Path(out).resolve()
            except (OSError, RuntimeError):
                continue
            how = ("is" if src == resolved else "holds" if resolved in src.parents else
                   "is inside" if src in resolved.parents else None)
        if how is not None:
            raise ValueError(
                f"output '{redact(out)}' {how} an input of this merge ('{redact(source)}'); writing it would destroy "
                "or change the input: choose another output path"
            )


def check_output_path(out: str | os.PathLike, overwrite: bool, *, inputs: Sequence[Any] = (),
                      folder: bool | None = None) -> None:
    """Refuse, before any work, a local output that cannot be written or must not be: something lightning-merge
    did not write is there (a user's file or folder, a link, a device:
    :class:`~lightning_merge.files.ownership.ForeignOutput`, whatever ``overwrite`` says), an earlier output is there
    and ``overwrite`` is False (:class:`FileExistsError`), it is one of the inputs, holds one or lies inside one, its
    parent is a file, it is a symbolic link loop, or it is a folder where a file is asked (``folder=False``) or a
    file where a folder is asked (``folder=True``).

    Also restores an output that a crash left moved aside, and removes abandoned temporary siblings. An
    object-storage URL is refused here: the writers that call this check write local paths only (``Path`` would fold
    ``s3://bucket/x`` into a local folder ``s3:/bucket/x``).
    """
    if is_url(out):
        raise ValueError(f"output '{redact(out)}' is a URL, and this output is written to a local path only: write it "
                         "to a local folder, then upload that (lightning_merge.files.remote.upload)")
    out = Path(out)
    try:
        cleanup_stale(out)
        exists = os.path.lexists(out)
        if exists and out.is_symlink() and not out.exists():
            out.resolve(strict=True)  # raises for a loop (a dangling link is refused below, as any link)
    except FileNotFoundError:
        pass
    except (RuntimeError, OSError) as err:
        if isinstance(err, RuntimeError) or err.errno == errno.ELOOP:
            raise ValueError(f"output '{out}' is a symbolic link loop; remove it or choose another path") from None
        raise ValueError(f"output '{out}' cannot be used: {err.strerror or err}") from None
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output '{out}' is under '{parent}', which is a file, not a folder")
        if parent.exists():
            break
    check_not_an_input(out, inputs)
    if exists:
        refuse_foreign(out)
        if folder is True and out.is_file():
            raise ValueError(f"output '{out}' is a file, and this output is a folder: remove it or choose another path")
        if folder is False and out.is_dir():
            raise ValueError(f"output '{out}' is a folder, and this output is a file: remove it or choose another path")
        if not overwrite:
            raise FileExistsError(
                f"output '{out}' already exists; pass overwrite=True (CLI: --overwrite) to replace it"
            )


def remove_output(target: str | os.PathLike) -> bool:
    """Delete an earlier output of lightning-merge (a sidecar or an adapter folder whose checkpoint was rotated
    away), local or at a URL; anything else there is left alone (the ownership rule holds for deletions too).
    Returns whether something was deleted."""
    if is_url(target):
        fs, path = filesystem(str(target))
        if not fs.exists(path) or remote_reason(fs, path) is not None:
            return False
        remove(str(target))
        return True
    target = Path(target)
    if not os.path.lexists(target) or local_reason(target) is not None:
        return False
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return True


__all__ = ["check_not_an_input", "check_output", "check_output_path", "remove_output"]
