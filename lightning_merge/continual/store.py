"""The on-disk store of a continual state: its layout, reading the last committed generation, the commit, the lock,
and the cleanup after a crashed add.

Layout of a state folder (docs/continual.md)::

    STATE/
      state.json                 configuration: format, version, strategy, base path, base fingerprint, tensors
      CURRENT                    the name of the current generation: the commit point (replaced atomically)
      ADDING                     while an add runs: the generation it is writing and the expert's checksum
      current -> generations/000003      a convenience link to it (refreshed after each commit)
      generations/000003/
        meta.json                count, per-expert norms and weights, the journal (name, path, checksum, order, time)
        running.safetensors      the running quantities of the strategy's continual form (Σwτ and Σw, OPCM's S...)
        model/model.safetensors  the current merged model (a safetensors folder: load it directly)
      .lock                      held while an expert is added

An add writes a complete new generation next to the current one, names it in ``ADDING``, renames it into place and
then replaces ``CURRENT`` (:meth:`StateStore._commit`): a crash at any point leaves the previous state whole. Readers
never take the lock and always see the last committed generation. The state deletes only what it wrote: generations
it named, never through a symbolic link (a state whose own files or folders are links is refused).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_merge.continual.layout import (
    FORMAT,
    GENERATION,
    MARKER,
    OWN,
    PARTIAL,
    POINTER,
    parse_meta,
    validate_config,
)
from lightning_merge.errors import ContinualError
from lightning_merge.files.atomic import atomic_file, cleanup_stale, fsync_dir, special_file_kind
from lightning_merge.files.ownership import refusal
from lightning_merge.files.remote import filesystem, redact
from lightning_merge.strategies.base import ContinualForm, Strategy

#: a reader retries this many times when an add commits and removes the generation it was reading
READ_ATTEMPTS = 20

log = logging.getLogger("lightning_merge")


class StateStore:
    """The on-disk half of a continual state: ``state.json``, the generations and the commit pointer of the folder
    ``path`` (for a state on object storage, its local mirror; ``url`` is then the state's address).

    :class:`~lightning_merge.ContinualState` is a store; the methods here read and write the layout only, never the
    strategy's running quantities.

    Attributes:
        path: the state's folder (or local mirror).
        url: the state's address on object storage, or None for a local state.
        config: ``state.json``, validated.
        strategy: the strategy ``state.json`` records.
        form: that strategy's continual form.
        on_missing: the state's missing-tensor policy (one of
            :data:`~lightning_merge.continual.layout.ON_MISSING`).
    """

    path: Path
    url: str | None
    config: dict[str, Any]
    strategy: Strategy
    form: ContinualForm
    on_missing: str

    def _open(self) -> None:
        """Read and check ``state.json`` (after refusing links among the state's own files)."""
        refuse_links(self.path)
        config = self.path / "state.json"
        if special_file_kind(config) is not None:
            raise ContinualError(f"'{config}' is {special_file_kind(config)}, not a file; the state is damaged")
        if not config.is_file():
            raise FileNotFoundError(
                f"'{self.path}' is not a continual-merge state (no state.json): create it first, or wait for the "
                "process creating it"
            )
        try:
            self.config = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ContinualError(f"'{config}' is not valid JSON ({err}); the state is damaged") from None
        validate_config(config, self.config)
        try:
            self.strategy = Strategy.from_dict(_written_defaults(self.config["strategy"]))
            self.form = self.strategy.continual_form()
        except (ValueError, TypeError) as err:
            raise ContinualError(f"'{config}': its strategy cannot be used: {err}") from None
        self.on_missing = self.config.get("on_missing", "error")

    # -- reading -------------------------------------------------------------------------------------------------
    # Readers take no lock: they read the pointer, then the generation it names. An add renames its generation into
    # place (named in ADDING first) before it replaces the pointer, and removes the previous generation after: a
    # reader that finds a generation the pointer does not name, or loses the one it named, reads again.

    @property
    def current(self) -> Path | None:
        """The last committed generation folder, or None before the first expert.

        Raises:
            ContinualError: the state names a generation that is gone, or has generations but no commit pointer.
        """
        return self._snapshot()[0]

    def _pointer(self) -> str | None:
        """The generation ``CURRENT`` names (or a version-1 state's ``current`` link), checked to be a generation
        name: never a path out of ``generations/``."""
        pointer = self.path / POINTER
        if os.path.lexists(pointer):
            refuse_links(self.path)
            with open(pointer, "rb") as handle:
                raw = handle.read(64)
            name = raw.decode(errors="replace").strip()
            if not GENERATION.fullmatch(name):
                raise ContinualError(f"'{pointer}' holds {name[:40]!r}, not a generation name; the state is damaged: "
                                     "write the name of the newest complete folder of generations/ into it")
            return name
        link = self.path / "current"
        if link.is_symlink():  # a state written before the pointer file existed
            name = Path(os.readlink(link)).name
            return name if GENERATION.fullmatch(name) else None
        return None

    def _marker(self) -> dict[str, Any] | None:
        """What ``ADDING`` says (the generation an add is writing, the expert's checksum), or None; a damaged marker
        reads as none (it only ever describes an add that has not finished)."""
        try:
            info = json.loads((self.path / MARKER).read_text())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError,
                RecursionError):
            return None
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("generation", "checksum")):
            return None
        return info

    def _committed(self) -> str | None:
        """The last committed generation's name, or None before the first commit. Generations without a pointer
        are an add in progress (or one that crashed before its commit) when ``ADDING`` names them; otherwise the
        pointer was lost, and the state is damaged."""
        name = self._pointer()
        if name is not None:
            return name
        folder = self.path / "generations"
        listed = {p.name for p in folder.iterdir() if GENERATION.fullmatch(p.name)} if folder.is_dir() else set()
        marker = self._marker()
        unexplained = listed - {marker["generation"]} if marker is not None else listed
        if not unexplained:
            return None
        name = self._pointer()  # an add committed (and removed ADDING) while this looked: read again
        if name is not None:
            return name
        raise ContinualError(
            f"continual state '{self.path}' holds generations ({', '.join(sorted(unexplained))}) but no {POINTER} "
            f"pointer: it is damaged; write the name of the newest complete generation into "
            f"'{self.path / POINTER}' to recover it"
        )

    def _snapshot(self) -> tuple[Path | None, dict[str, Any]]:
        """The last committed generation and its ``meta.json``, read consistently while other processes add."""
        for _ in range(READ_ATTEMPTS):
            name = self._committed()
            if name is None:
                return None, {"count": 0, "norms": [], "weights": [], "journal": []}
            folder = self.path / "generations" / name
            try:
                text = (folder / "meta.json").read_text()
            except (FileNotFoundError, NotADirectoryError):
                if self._pointer() != name:  # a newer add committed and removed it meanwhile
                    continue
                raise ContinualError(
                    f"continual state '{self.path}': its current generation '{name}' is missing or incomplete; the "
                    "state is damaged (restore the folder from a backup, or start a new state)"
                ) from None
            return folder, parse_meta(folder / "meta.json", text)
        raise ContinualError(f"continual state '{self.path}' changed {READ_ATTEMPTS} times while being read; "
                             "read it again")

    # -- writing -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with flock(self.path):
            yield

    def _partial(self) -> Path:
        """A new folder name under ``generations/`` for an add to write its generation into before the commit."""
        return self.path / "generations" / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _commit(self, tmp: Path, number: int, checksum: str) -> Path:
        """Make the complete generation written in ``tmp`` the current one, as generation ``number``: name it in
        ``ADDING``, rename it into place, then replace ``CURRENT`` (the commit point). Returns its folder."""
        # on object storage a generation is uploaded before the commit, so its name must be one no other writer
        # can pick: a losing writer's upload then never touches the committed generation
        unique = f"-{uuid.uuid4().hex[:8]}" if self.url is not None else ""
        final = self.path / "generations" / f"{number:06d}{unique}"
        # named before it appears: a reader then knows it is not committed, and a retry of this add after a
        # kill past the commit completes it instead of calling the expert a duplicate
        with atomic_file(self.path / MARKER) as marker:
            marker.write_text(json.dumps({"generation": final.name, "checksum": checksum, "pid": os.getpid()}))
        if final.exists():  # left by a crash after the rename but before the commit: not current, replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        with atomic_file(self.path / POINTER) as pointer:  # the commit point
            pointer.write_text(final.name + "\n")
        return final

    def _finish(self, final: Path, previous: Path | None, publish: Callable[[], None] | None) -> None:
        """After the commit of ``final``: refresh the link, remove the ``previous`` generation, ``publish`` (a
        state on object storage uploads and commits there), and end the add by removing ``ADDING``."""
        self._refresh_link(final)
        if previous is not None and previous != final:
            self._remove_generation(previous)
        if publish is not None:
            publish()
        # the add has finished: the last step (not made durable: if a crash undoes it, ADDING names the current
        # generation again and a retry of this add completes it)
        (self.path / MARKER).unlink(missing_ok=True)

    def _refresh_link(self, final: Path) -> None:
        """Point the convenience link ``current`` at ``final`` (replacing a stale link, or a folder a copy made)."""
        link = self.path / "current"
        if os.path.lexists(link) and not link.is_symlink():
            if not (link.is_dir() and {p.name for p in link.iterdir()} <= {"meta.json", "running.safetensors",
                                                                            "model"}):
                raise ContinualError(
                    f"continual state '{self.path}': '{link}' is not the state's link to its current generation (nor a "
                    "copy of one); it was not written by lightning-merge: move it out of the state"
                )
            shutil.rmtree(link)  # a copy of the state (shutil.copytree) turned the link into a folder
        tmp = self.path / f".current-{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.relpath(final, self.path), tmp)
        os.replace(tmp, link)
        fsync_dir(self.path)

    def _remove_generation(self, folder: Path) -> None:
        """Delete a generation that is no longer current, unless someone saved files into it (a tokenizer next to
        the merged model, an evaluation): those are the user's, so the folder is left, with a warning naming them."""
        base = Path(self.config["base"])
        copied = {p.name for p in base.iterdir() if p.is_file()} if base.is_dir() else set()
        written = {"": {"meta.json", "running.safetensors", "model"}, "model": {"model.safetensors"} | copied}
        foreign = []
        for root, dirs, files in os.walk(folder):
            rel = os.path.relpath(root, folder)
            rel = "" if rel == "." else rel
            foreign += [os.path.join(rel, n) for n in dirs + files if n not in written.get(rel, set())]
        if foreign:
            log.warning("continual state '%s': generation '%s' is no longer current but holds files the state did not "
                        "write (%s): left in place; move them out and delete the folder", self.url or self.path,
                        folder.name, ", ".join(sorted(foreign)[:3]))
            return
        shutil.rmtree(folder, ignore_errors=True)

    def _cleanup(self) -> None:
        """Remove what a crashed add left behind (partial generations, generations never committed, old
        generations, stray links) and repair the convenience link; the commit pointer decides what is current
        (never the link, which a copy can break). Only what the state names is removed: folders of ``generations/``
        named as the state names generations, never another file, and never through a symbolic link."""
        refuse_links(self.path)
        generations = self.path / "generations"
        generations.mkdir(exist_ok=True)
        current = self.current
        for item in generations.iterdir():
            if not (GENERATION.fullmatch(item.name) or PARTIAL.fullmatch(item.name)):
                continue  # not the state's: left alone
            if item.is_symlink():
                raise ContinualError(
                    f"continual state '{self.path}': '{item}' is a symbolic link (to '{os.readlink(item)}'); the "
                    "state's generations must be its own folders, since an add replaces and deletes them: replace "
                    "the link by a copy of its target"
                )
            if item.is_dir() and (current is None or item.name != current.name):
                self._remove_generation(item)
        marker = self._marker()
        if os.path.lexists(self.path / MARKER) and (marker is None or current is None
                                                    or marker["generation"] != current.name):
            (self.path / MARKER).unlink()  # an add that never committed (its generation is gone now)
        for item in self.path.glob(".current-*"):
            if item.is_symlink():
                item.unlink()
        cleanup_stale(self.path / POINTER)
        cleanup_stale(self.path / MARKER)
        if current is not None:
            if not (self.path / POINTER).is_file():  # a state written by version 1: adopt its link as the pointer
                with atomic_file(self.path / POINTER) as pointer:
                    pointer.write_text(current.name + "\n")
            link = self.path / "current"
            if not link.is_symlink() or Path(os.readlink(link)).name != current.name:
                self._refresh_link(current)


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """Hold the state's exclusive lock (``path/.lock``): adds, and the creation of ``state.json``, take turns.

    Raises:
        ContinualError: the lock file cannot be opened (no write access to the state's folder).
    """
    try:
        handle = open(path / ".lock", "a+")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise ContinualError(f"continual state '{path}': cannot open its lock file '{path / '.lock'}' "
                             f"({err.strerror or err}); adding needs write access to the state's folder") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_links(path: Path) -> None:
    """A state's own files and folders must be its own: not symbolic links (an add replaces and deletes inside them,
    and through a link it would touch what the link points to: a shared folder, another state), and not a folder
    where the state keeps a file (or the reverse).

    Raises:
        ContinualError: naming the link, file or folder.
    """
    for name in OWN:
        item = path / name
        if item.is_symlink():
            raise ContinualError(
                f"continual state '{path}': '{item}' is a symbolic link (to '{os.readlink(item)}'); a state's own "
                "files and folders must not be links, since an add replaces and deletes inside them: replace the link "
                "by a copy of its target"
            )
        folder = name == "generations"
        if item.exists() and item.is_dir() != folder:
            raise ContinualError(
                f"continual state '{path}': '{item}' is a {'file' if folder else 'folder'}, not the state's "
                f"{'folder' if folder else 'file'}; it was not written by lightning-merge: move it out of the state"
            )


def refuse_foreign(path: Path) -> None:
    """A new state goes into a new or empty folder: the state's cleanup deletes what it names, and a folder holding
    other files (a model, an expert, notes) is not one the state should write into.

    Raises:
        ContinualError: links among the state's own names (:func:`refuse_links`).
        ForeignOutput: ``path`` holds other files (:func:`~lightning_merge.files.ownership.refusal`).
    """
    if not path.is_dir():
        return
    refuse_links(path)
    foreign = sorted(p.name for p in path.iterdir()
                     if not (p.name == ".lock" or p.name.startswith(".state.json.partial-")
                             or (p.name == "generations" and not any(p.iterdir()))))
    if foreign:
        listing = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise refusal(path, f"holds files and no continual state ({listing}); a continual state needs a new or empty "
                            "folder")


def refuse_occupied(url: str | None, path: Path) -> None:
    """A new state goes into a new or empty folder: never into a folder (or a bucket prefix) holding other files,
    which its later adds and tidying would mix with its own (see :mod:`lightning_merge.files.ownership`).

    Args:
        url: the state's address on object storage, or None for a local state.
        path: the local state folder (used when ``url`` is None).
    """
    if url is not None:
        fs, remote = filesystem(url)
        held = sorted(p.rsplit("/", 1)[-1] for p in fs.find(remote)) if fs.exists(remote) else []
    elif os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
        raise refusal(path, "is not a folder; a continual state needs a new or empty folder")
    else:
        held = sorted(p.name for p in path.iterdir() if p.name != ".lock") if path.is_dir() else []
    if held:
        raise refusal(redact(url) if url else path, f"holds files and no continual state ({', '.join(held[:3])}"
                                                   f"{' ...' if len(held) > 3 else ''}); a continual state needs a "
                                                   "new or empty folder")


def state_holding(path: Path) -> Path | None:
    """The continual state folder ``path`` lies in (its ``state.json`` above it), or None.

    Args:
        path: a local path (a base model, an expert).
    """
    for parent in path.parents:
        config = parent / "state.json"
        if (parent / "generations").is_dir() and config.is_file():
            with contextlib.suppress(OSError, ValueError, RecursionError):
                found = json.loads(config.read_text())
                if isinstance(found, dict) and found.get("format") == FORMAT:
                    return parent
    return None


def _written_defaults(spec: Any) -> Any:
    """A stored strategy with the defaults it was created under where a later version changed them: OTA folded the
    bias-corrected v̂ before ``bias_correct`` existed (its default is now the raw v), so a state written without
    the argument keeps v̂ for the experts it adds next."""
    if isinstance(spec, dict):
        spec = {k: _written_defaults(v) for k, v in spec.items()}
        if spec.get("name") == "ota" and "bias_correct" not in spec:
            spec["bias_correct"] = True
    elif isinstance(spec, list):
        spec = [_written_defaults(v) for v in spec]
    return spec
