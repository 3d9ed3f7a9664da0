"""Loading ``torch.save`` files (Lightning ``.ckpt``, ``.bin``, ``.pt``) without running their code.

``torch.load(weights_only=True)`` only: custom objects (a Namespace in ``hyper_parameters``, a tokenizer) are refused
with a message naming the object and the explicit opt-in ``trust_checkpoint=True``. Empty, truncated, corrupted and
crafted files (a tensor declaring more bytes than the file holds) are refused with one clear line naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_merge.errors import CheckpointError
from lightning_merge.files.atomic import special_file_kind


def _custom_object_error(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ([\w.]+)", text)
    what = match.group(1) if match else "a custom Python object"
    return CheckpointError(
        f"'{path}' holds {what} (typically in hyper_parameters from save_hyperparameters()), which a safe load "
        f"refuses. If you trust this file, pass trust_checkpoint=True (CLI: --trust-checkpoint): that unpickles it "
        f"and can run arbitrary code."
    )


def _is_custom_object_refusal(err: Exception) -> bool:
    """The safe unpickler refused a named global (a class or function): the file is a checkpoint holding objects."""
    return re.search(r"GLOBAL [\w.]+", str(err)) is not None


def load_torch_file(path: str | os.PathLike, trust_checkpoint: bool = False) -> Any:
    """``torch.load`` a file safely (memory-mapped where the format allows).

    Args:
        path: the file.
        trust_checkpoint: unpickle arbitrary objects (only for files you trust: it can run code).

    Raises:
        CheckpointError: the file is empty, truncated, corrupted, not a ``torch.save`` file, declares tensors larger
            than its data, or holds custom objects (without ``trust_checkpoint``).
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' does not exist") from None
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file")
    special = special_file_kind(path)
    if special is not None:
        raise CheckpointError(f"'{path}' is {special}, not a checkpoint file: reading it could wait forever; give "
                              "the file itself")
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes): not a checkpoint; was its write interrupted?")
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust_checkpoint}
    try:
        with warnings.catch_warnings():  # the safe unpickler warns about pickle protocols of files it then refuses
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            try:
                return torch.load(path, mmap=True, **kwargs)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
            # The legacy (non-zip) format cannot be memory-mapped: load it plainly, outside the handler above.
            return torch.load(path, **kwargs)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ValueError... by case
        if not trust_checkpoint and _is_custom_object_refusal(err):
            raise _custom_object_error(path, err) from None
        text = " ".join(str(err).split())
        operand = re.search(r"Unsupported operand \d+", text)
        if "out of bounds for storage" in text or "storage of size" in text:
            reason = "it declares a tensor larger than the data it holds (corrupted or crafted)"
        elif "zip archive" in text or "central directory" in text or "EOF" in text or isinstance(err, EOFError):
            reason = "it is truncated or not a torch.save file"
        elif operand or "magic number" in text or "invalid load key" in text:
            what = operand.group(0) if operand else "bad magic"
            reason = f"it is not a torch.save file the safe loader reads ({what}): random bytes, a raw pickle, or a " \
                     "corrupted checkpoint"
        else:
            reason = f"{type(err).__name__}: {text[:200]}"
        raise CheckpointError(f"cannot load '{path}' as a PyTorch/Lightning checkpoint: {reason}") from None


class _RecordingFile:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's writer reports a full
    disk only as "[enforce fail at inline_container.cc] unexpected pos"."""

    def __init__(self, file: Any):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``; a write the filesystem refuses raises its ``OSError`` naming ``path`` (disk full,
    read-only, no permission) instead of torch's "[enforce fail at inline_container.cc]"."""
    with open(path, "wb") as file:
        recorder = _RecordingFile(file)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise OSError(recorder.error.errno, recorder.error.strerror, str(path)) from None
            raise


__all__ = ["CheckpointError", "load_torch_file", "save_torch_file"]
