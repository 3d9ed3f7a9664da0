"""A continual state on object storage (``s3://...``): a local mirror of the committed generation, kept in step by a
lease (machines take turns) and a compare-and-swap of ``CURRENT`` (the commit: correctness rests on it alone).

An add pulls the committed generation into the mirror, writes the new one there as a local state does, uploads it,
then moves ``CURRENT`` only if no other writer committed since the pull; else nothing is committed and the add is
reported (retry it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from lightning_merge.continual.layout import POINTER
from lightning_merge.continual.store import StateStore
from lightning_merge.errors import ContinualError
from lightning_merge.files.atomic import atomic_file
from lightning_merge.files.remote import (
    PreconditionFailed,
    cache_dir,
    download_tree,
    filesystem,
    join,
    put_conditional,
    read_versioned,
    remove,
    upload,
)


class RemoteStore(StateStore):
    """A :class:`~lightning_merge.continual.store.StateStore` that, when ``url`` is set, mirrors a state kept in
    object storage and commits there (a local state, ``url`` None, uses none of these methods)."""

    def _pull(self) -> str | None:
        """Mirror the committed generation (``CURRENT``, its folder, ``state.json``); return CURRENT's ETag (None
        before the first expert): the add commits only if CURRENT still has it."""
        assert self.url is not None
        self.path.mkdir(parents=True, exist_ok=True)
        config = read_versioned(join(self.url, "state.json"))
        if config is None:
            raise FileNotFoundError(f"'{self.url}' is not a continual-merge state (no state.json); create it first")
        if not (self.path / "state.json").is_file() or (self.path / "state.json").read_bytes() != config[0]:
            with atomic_file(self.path / "state.json") as tmp:
                tmp.write_bytes(config[0])
        pointer = read_versioned(join(self.url, POINTER))
        if pointer is None:
            (self.path / POINTER).unlink(missing_ok=True)
            shutil.rmtree(self.path / "generations", ignore_errors=True)
            (self.path / "generations").mkdir()
            return None
        name = pointer[0].decode().strip()
        if not name or "/" in name or name.startswith("."):
            raise ContinualError(f"'{join(self.url, POINTER)}' holds {name!r}, not a generation name; the state is "
                                 "damaged")
        folder = self.path / "generations" / name
        mirrored = self.path / ".mirrored"  # the ETag of the CURRENT this mirror reflects
        fresh = mirrored.is_file() and mirrored.read_text() == pointer[1] and self._pointer() == name
        if not fresh or not (folder / "meta.json").is_file():
            # an add that was not committed (a lost compare-and-swap, a crash mid-upload) may have left the mirror
            # ahead of the store, under the same generation name: the store decides
            download_tree(join(self.url, "generations", name), folder)
            with atomic_file(self.path / POINTER) as tmp:
                tmp.write_text(name + "\n")
            self._mark_mirrored(pointer[1])
        return pointer[1]

    def _mark_mirrored(self, etag: str) -> None:
        with atomic_file(self.path / ".mirrored") as tmp:
            tmp.write_text(etag)

    def _push(self, etag: str | None) -> None:
        """Upload the generation just written locally, then commit it by a compare-and-swap of ``CURRENT``: the
        generation's objects are all in place before the pointer names it, and the pointer moves only if no other
        writer committed since :meth:`_pull` (else the add is reported and nothing is lost: retry it)."""
        assert self.url is not None
        name = self._pointer()
        assert name is not None
        upload(self.path / "generations" / name, join(self.url, "generations", name))
        try:
            committed = put_conditional(join(self.url, POINTER), (name + "\n").encode(), if_match=etag)
        except PreconditionFailed:
            (self.path / ".mirrored").unlink(missing_ok=True)  # the mirror is stale: the next pull refetches
            raise ContinualError(
                f"continual state '{self.url}': another writer committed while this expert was being added; nothing "
                "was committed by this add: retry it"
            ) from None
        self._mark_mirrored(committed)
        fs, root = filesystem(join(self.url, "generations"))
        for item in fs.ls(root, detail=False):  # generations no pointer names any more (this add's predecessor,
            if item.rstrip("/").rsplit("/", 1)[-1] != name:  # a crashed add's upload)
                remove(f"{self.url.split('://', 1)[0]}://{item}")

    @contextlib.contextmanager
    def _remote_lease(self, timeout: float = 600.0, ttl: float = 3600.0) -> Iterator[None]:
        """Take turns with other machines: a ``LEASE`` object created only if absent (expired leases are broken).
        Correctness does not rest on it (the conditional CURRENT write does); it saves a losing add its work."""
        import socket
        import time

        assert self.url is not None
        lease = join(self.url, "LEASE")
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        while True:
            body = json.dumps({"owner": owner, "expires": time.time() + ttl}).encode()
            try:
                put_conditional(lease, body)
                break
            except PreconditionFailed:
                held = read_versioned(lease)
                try:
                    info = json.loads(held[0]) if held else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    info = {}
                if held is not None and float(info.get("expires", 0)) < time.time():
                    remove(lease)  # its holder died: break it
                    continue
                if time.monotonic() > deadline:
                    raise ContinualError(
                        f"continual state '{self.url}' is being added to by {info.get('owner', 'another process')} "
                        f"(waited {timeout:.0f} s); if that process is gone, delete '{lease}'"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            held = read_versioned(lease)
            if held is not None and owner.encode() in held[0]:
                remove(lease)


def mirror(url: str) -> Path:
    """The local mirror of a continual state kept in object storage (under the fetch cache).

    Args:
        url: the state's address.
    """
    return cache_dir() / "continual" / hashlib.sha256(url.encode()).hexdigest()[:24]
