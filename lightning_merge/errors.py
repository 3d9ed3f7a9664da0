"""Every error lightning-merge raises on purpose derives from :class:`LightningMergeError` (catch that one for
all of them); each also keeps the builtin base it had (``ValueError``, ``OSError``, ...), so existing ``except``
clauses keep working. The message of each names the file, tensor or argument at fault and what to do."""

from __future__ import annotations

from pathlib import Path


class LightningMergeError(Exception):
    """The base of every error lightning-merge raises on purpose."""


class PreconditionFailed(LightningMergeError):
    """A conditional write lost: the object exists (create-only) or changed since it was read (compare-and-swap)."""


class RecipeError(ValueError, LightningMergeError):
    """A recipe that cannot be merged; the message names the recipe and the offending entry."""


class StatisticsError(ValueError, LightningMergeError):
    """A sidecar that is missing, corrupted, or does not match its expert."""


class MissingStatistic(StatisticsError):
    """No statistic of the asked kind for the asked tensor (the others are errors in what is there)."""


class CheckpointError(ValueError, LightningMergeError):
    """A ``torch.save`` file that cannot be loaded safely: corrupted, truncated, or holding custom objects."""


class SafetensorsError(ValueError, LightningMergeError):
    """A safetensors file that is truncated, corrupted or malformed; the message names the file and the entry.

    Attributes:
        path: the file.
        reason: what is wrong with it (the message without the file's name).
    """

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"safetensors file '{path}' {reason}")
        self.path = Path(path)
        self.reason = reason


class DuplicateKeyError(ValueError, LightningMergeError):
    """A JSON object that gives one key twice (``args[0]`` is the key)."""


class ContinualError(ValueError, LightningMergeError):
    """An expert that cannot be folded in (another base, other tensors, a duplicate), or a broken state."""


class NoContinualForm(ValueError, LightningMergeError):
    """The strategy cannot fold experts one at a time (the message says why and what to use instead)."""


class ForeignOutput(FileExistsError, LightningMergeError):
    """Something lightning-merge did not write is at an output path: it is never replaced, whatever flag is passed."""


class IncompleteOutput(ValueError, LightningMergeError):
    """A folder output whose upload is in progress or was interrupted (it holds ``lightning_merge.incomplete``):
    never read, since it may hold a mix of an old and a new output."""


class MissingLoader(ValueError, LightningMergeError):
    """The Trainer has no dataloader of the kind a post-fit pass reads."""


class RankZeroError(RuntimeError, LightningMergeError):
    """Raised on the other ranks when the work rank 0 did for all of them failed."""


class DtypeRangeError(ValueError, LightningMergeError):
    """A finite value too large for the dtype a tensor is written in (float16 stops at 65504): it would be written as
    an infinity (or, in a saturating float8 dtype, clamped). The message names the tensor, the dtype, the largest
    magnitude and what to do."""


class OutputError(OSError, LightningMergeError):
    """The filesystem refused to write an output (full, over quota, read-only, no permission). The message names the
    output and what to do; ``errno`` is the system's, and nothing partial is left behind."""

    def __str__(self) -> str:
        return str(self.strerror)


class AdapterError(ValueError, LightningMergeError):
    """A PEFT adapter folder that cannot be read as an expert (the message names the folder and the module)."""


class PeerFailed(RuntimeError, LightningMergeError):
    """Another rank of a distributed merge failed; the message is its error."""


__all__ = [
    "AdapterError",
    "CheckpointError",
    "ContinualError",
    "DtypeRangeError",
    "DuplicateKeyError",
    "ForeignOutput",
    "IncompleteOutput",
    "LightningMergeError",
    "MissingLoader",
    "MissingStatistic",
    "NoContinualForm",
    "OutputError",
    "PeerFailed",
    "PreconditionFailed",
    "RankZeroError",
    "RecipeError",
    "SafetensorsError",
    "StatisticsError",
]
