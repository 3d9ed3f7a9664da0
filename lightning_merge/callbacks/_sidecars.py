"""Sidecars that follow the Trainer's checkpoints: a thin wrapper around the strategy's ``CheckpointIO`` sees every
save and every removal (ModelCheckpoint's top-k and ``last``, ``trainer.save_checkpoint``, rotation), and a
:class:`SidecarWriter` writes ``X.statistics.safetensors`` next to ``X.ckpt`` (in a background thread, joined before
the next optimizer step changes what it reads, before its checkpoint is removed, and at fit end) or deletes it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from lightning_merge.files.outputs import remove_output
from lightning_merge.formats.sidecar import sidecar_path


class SidecarWriter:
    """Writes and deletes sidecars, optionally in one background thread.

    Args:
        write: ``write(target, snapshot)`` writes one sidecar from a snapshot of the statistics.
        async_write: write in a background thread.
    """

    def __init__(self, write: Callable[[Any, Any], None], async_write: bool = True):
        self._write = write
        self.async_write = async_write
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def save(self, checkpoint_path: str, snapshot: Any) -> None:
        """Write the sidecar of ``checkpoint_path`` from ``snapshot``."""
        target = sidecar_path(checkpoint_path)

        def write() -> None:
            self._write(target, snapshot)

        if not self.async_write:
            write()
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-sidecar")
            self._futures[str(target)] = self._executor.submit(write)

    def remove(self, checkpoint_path: str) -> None:
        """Delete the sidecar of a checkpoint that was removed (waiting for its write first)."""
        target = sidecar_path(checkpoint_path)
        with self._lock:
            future = self._futures.pop(str(target), None)
        if future is not None:
            future.result()
        remove_output(target)  # a sidecar (local or in a bucket); never a file lightning-merge did not write

    def wait(self) -> None:
        """Block until the pending writes are done (they read live tensors the next step changes); re-raise."""
        if not self._futures:
            return
        with self._lock:
            futures = list(self._futures.items())
        for path, future in futures:
            future.result()
            with self._lock:
                if self._futures.get(path) is future:
                    del self._futures[path]

    def flush(self) -> None:
        """Wait for every pending write; re-raise the first failure."""
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.result()

    def close(self) -> None:
        self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class SidecarCheckpointIO(CheckpointIO):
    """Delegates to the strategy's CheckpointIO and tells ``owner`` about each save and removal
    (``owner.after_save(checkpoint, path)``, ``owner.after_remove(path)``)."""

    def __init__(self, inner: CheckpointIO, owner: Any):
        self.inner = inner
        self.owner = owner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.owner.after_save(checkpoint, str(path))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        self.owner.after_remove(str(path))

    def teardown(self) -> None:
        self.inner.teardown()


__all__ = ["SidecarCheckpointIO", "SidecarWriter"]
