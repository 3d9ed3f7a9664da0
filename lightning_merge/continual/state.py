"""Continual merging: a state folder that folds experts in one at a time, crash-safe, in constant memory and time
per added expert whatever the number already merged.

The state is only a transactional store: what is kept per tensor and how an expert is folded in is the strategy's
continual form (:meth:`~lightning_merge.strategies.Strategy.continual_form`), asked for when the state is created.

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

Adding an expert writes a complete new generation next to the current one, streamed tensor by tensor (read the
running quantities, fold, write; then finish and write the model), then replaces ``CURRENT``: a crash at any point
leaves the previous state whole, and the add can be retried (a retry of an add killed after its commit completes it).
Two processes adding at once take turns (an exclusive ``fcntl`` lock), so neither expert is lost; readers never take
the lock and always see the last committed generation. The state deletes only what it wrote: generations it named,
never through a symbolic link (a state whose own files or folders are links is refused).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics as _statistics
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge._version import __version__
from lightning_merge.engine.writers import copy_support_files, write_json
from lightning_merge.errors import ContinualError
from lightning_merge.files.atomic import atomic_file, cleanup_stale, fsync_dir, special_file_kind, writing
from lightning_merge.files.finite import cast_checked, largest_magnitude
from lightning_merge.files.ownership import refusal
from lightning_merge.files.remote import (
    PreconditionFailed,
    cache_dir,
    download_tree,
    filesystem,
    is_url,
    join,
    put_conditional,
    read_versioned,
    redact,
    remove,
    upload,
)
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.files.safetensors import SafetensorsError, SafetensorsFile, ShardWriter, TensorSpec
from lightning_merge.formats.sidecar import StatisticsError, tensor_fingerprint
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies.base import ContinualForm, ContinualSummary, NoContinualForm, Strategy

FORMAT = "lightning-merge/continual"
FORMAT_VERSION = 2
POINTER = "CURRENT"
#: how the dtype of a continual state's model is chosen (it is the base's), for messages
CONTINUAL_DTYPE_HINT = ("a continual model is written in its base's dtype: create the state over a copy of the base in "
                        "that dtype")
#: written before an add renames its generation into place, removed when the add has finished: names the generation
#: being added and the expert's checksum, so a reader knows that generation is not committed yet and a retry of an add
#: killed after its commit can complete it.
MARKER = "ADDING"
#: the missing-tensor policies a state can record (as ``merge(..., on_missing=...)``): ``"error"`` refuses an expert
#: whose tensors are not exactly the base's; ``"base"`` keeps the base's tensors only (an expert's extra tensors are
#: left out, a base tensor the expert lacks counts as unchanged).
ON_MISSING = ("error", "base")
#: the names a state gives its generations (a bucket's have a unique suffix) and the folders an add writes into first
_GENERATION = re.compile(r"\d{6}(?:-[0-9a-f]{8})?")
_PARTIAL = re.compile(r"\.partial-\d+-[0-9a-f]{8}")
#: the state's own files and folders directly under its path (``current`` is a link the state writes)
_OWN = ("state.json", POINTER, MARKER, "generations", ".lock")
#: a reader retries this many times when an add commits and removes the generation it was reading
_READ_ATTEMPTS = 20

log = logging.getLogger("lightning_merge")
#: an expert whose task vector is this many times longer than the median expert already merged is refused as not
#: fine-tuned from the base (an unrelated model); a third of that is warned about.
MAX_RELATIVE_NORM = 10.0



def expert_checksum(expert: Expert) -> str:
    """Identity of an expert's weights: sha256 over names, shapes and sampled fingerprints of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(expert.names()):
        digest.update(name.encode())
        digest.update(tensor_fingerprint(expert.tensor(name)).encode())
    return digest.hexdigest()



def _refuse_occupied(url: str | None, path: Path) -> None:
    """A new state goes into a new or empty folder: never into a folder (or a bucket prefix) holding other files,
    which its later adds and tidying would mix with its own (see :mod:`lightning_merge.files.ownership`)."""
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


class ContinualState:
    """A continual-merge state folder. Create it once, then :meth:`add` experts as they finish.

    Example::

        state = ContinualState.create("merged-state", base="base/", strategy=OPCM(alpha=0.5))
        state.add("runs/task1/final.safetensors")
        state.add("runs/task2/final.safetensors")
        state.model_path                          # STATE/current/model: a safetensors folder
        state.journal                             # what was folded in, in order

    Any strategy with a continual form works (``Strategy.continual_form()``): Linear, TaskArithmetic, DARE and
    Breadcrumbs without election, CABS, Fisher, OTA (with Fast Fisher Grafting), OPCM, LiNeS with a fixed α over
    any of them. Folding experts in one at a time gives the same model as merging them all at once with the same
    strategy; strategies whose merge needs every expert at once (TIES' election, the weighted median, consensus)
    are refused when the state is created.
    """

    def __init__(self, path: str | os.PathLike):
        self.url: str | None = str(path).rstrip("/") if is_url(path) else None
        if self.url is not None:  # object storage: a local mirror of the state, synchronised by the commit protocol
            self.path = _mirror(self.url)
            self._pull()
        else:
            self.path = Path(path)
        _refuse_links(self.path)
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
        _validate_config(config, self.config)
        try:
            self.strategy = Strategy.from_dict(self.config["strategy"])
            self.form: ContinualForm = self.strategy.continual_form()
        except (ValueError, TypeError) as err:
            raise ContinualError(f"'{config}': its strategy cannot be used: {err}") from None
        self.on_missing: str = self.config.get("on_missing", "error")

    # -- creation ------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        base: str | os.PathLike,
        strategy: Strategy | Mapping[str, Any],
        *,
        exist_ok: bool = False,
        on_missing: str = "error",
    ) -> ContinualState:
        """Create a state folder for merging experts of ``base`` with ``strategy``.

        Args:
            path: the folder (created; it must be new or empty: a state deletes and replaces files inside it).
            base: the base model every expert was fine-tuned from (a path or a URL: the state refers to it and
                checks, at every add, that it has not changed; a URL with credentials or a signature is refused, since
                state.json would store them).
            strategy: a strategy with a continual form, or its ``to_dict()``.
            exist_ok: return the existing state if ``path`` already holds one with the same base, strategy and
                ``on_missing``.
            on_missing: an expert whose tensors are not exactly the base's, as ``merge(..., on_missing=...)``:
                ``"error"`` (the default) refuses it, naming the tensor; ``"base"`` leaves its extra tensors (a new
                head) out of the merge and counts a base tensor it lacks as unchanged (refused where the strategy
                weighs experts by statistics, which such an expert does not have for that tensor).

        Raises:
            ContinualError: the strategy has no continual form (the message says why), ``path`` holds a state with
                another base, strategy or policy, or holds files that are not a state's, or ``base`` is a URL with
                credentials or a signature.
        """
        strategy = strategy if isinstance(strategy, Strategy) else Strategy.from_dict(strategy)
        try:
            strategy.continual_form()
        except NoContinualForm as err:
            raise ContinualError(str(err)) from None
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {', '.join(ON_MISSING)} for a continual state, got "
                             f"{on_missing!r} ('union' and 'intersection' would change the model's tensors from one "
                             "expert to the next)")
        url = str(path).rstrip("/") if is_url(path) else None
        base_ref = str(base) if is_url(base) else str(Path(base).resolve())
        if redact(base_ref) != base_ref:  # state.json would hold them, and it is read again at every add
            raise ContinualError(
                f"base '{redact(base_ref)}' carries credentials or a signature, which the state would store in its "
                "state.json (it reads the base again at every add): give the credentials through the environment "
                "(AWS_ACCESS_KEY_ID, a profile, ...) and the URL without them"
            )
        path = Path(path) if url is None else _mirror(url)
        holder = None if is_url(base) else _state_holding(Path(base_ref))
        if holder is not None:
            raise ContinualError(
                f"base '{base}' is inside the continual state '{holder}', whose generations are replaced at every add "
                "(the state refers to its base at every add): copy the model out of the state first"
            )

        def existing() -> ContinualState:
            if not exist_ok:
                raise FileExistsError(f"continual state '{url or path}' already exists")
            state = cls(url or path)
            if (state.strategy.to_dict() != strategy.to_dict() or state.config["base"] != base_ref
                    or state.on_missing != on_missing):
                raise ContinualError(f"continual state '{url or path}' exists with another base, strategy or "
                                     "on_missing policy")
            return state

        if url is not None:
            if remote_exists(join(url, "state.json")):
                return existing()
            _refuse_occupied(url, path)
        else:
            if path.exists() and not path.is_dir():
                raise ContinualError(f"'{path}' is a file; a continual state is a folder: choose another path")
            if (path / "state.json").exists():
                return existing()
            _refuse_foreign(path)
        base_expert = as_expert(str(base), "base")
        names = [n for n in base_expert.names() if base_expert.spec(n).is_floating]
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "strategy": strategy.to_dict(),
            "base": base_ref,
            "created": _now(),
            "tensors": {n: list(base_expert.spec(n).shape) for n in names},
            "base_fingerprint": {n: tensor_fingerprint(base_expert.tensor(n)) for n in names},
        }
        if on_missing != "error":
            config["on_missing"] = on_missing
        if url is not None:  # created by one conditional write: of two creators, one wins and the other is told
            try:
                put_conditional(join(url, "state.json"), json.dumps(config, indent=2).encode())
            except PreconditionFailed:
                raise FileExistsError(f"continual state '{url}' already exists (created concurrently)") from None
            shutil.rmtree(path, ignore_errors=True)  # a mirror of an earlier state at this URL
            return cls(url)
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
            with _flock(path):  # two creators: one writes state.json, the other finds it (exist_ok) or is told
                if (path / "state.json").exists():
                    created = None
                else:
                    _refuse_foreign(path)
                    (path / "generations").mkdir(exist_ok=True)
                    with atomic_file(path / "state.json") as tmp:
                        tmp.write_text(json.dumps(config, indent=2))
                    created = cls(path)
        return created if created is not None else existing()

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
            _refuse_links(self.path)
            with open(pointer, "rb") as handle:
                raw = handle.read(64)
            name = raw.decode(errors="replace").strip()
            if not _GENERATION.fullmatch(name):
                raise ContinualError(f"'{pointer}' holds {name[:40]!r}, not a generation name; the state is damaged: "
                                     "write the name of the newest complete folder of generations/ into it")
            return name
        link = self.path / "current"
        if link.is_symlink():  # a state written before the pointer file existed
            name = Path(os.readlink(link)).name
            return name if _GENERATION.fullmatch(name) else None
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
        listed = {p.name for p in folder.iterdir() if _GENERATION.fullmatch(p.name)} if folder.is_dir() else set()
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
        for _ in range(_READ_ATTEMPTS):
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
            return folder, _parse_meta(folder / "meta.json", text)
        raise ContinualError(f"continual state '{self.path}' changed {_READ_ATTEMPTS} times while being read; "
                             "read it again")

    @property
    def model_path(self) -> Path | None:
        """The merged model (a safetensors folder), or None before the first expert. It stays in place until the
        next add commits (then the next generation's replaces it)."""
        current = self.current
        return (current / "model") if current is not None else None

    def meta(self) -> dict[str, Any]:
        """The current generation's ``meta.json``: count, norms, weights, journal (empty before the first
        expert)."""
        return self._snapshot()[1]

    @property
    def journal(self) -> list[dict[str, Any]]:
        """The experts folded in, in order: name, path, checksum, order, time."""
        return self.meta()["journal"]

    @property
    def count(self) -> int:
        return self.meta()["count"]

    def state_dict(self) -> dict[str, Tensor]:
        """The current merged model as a state dict (base tensors before the first expert)."""
        for _ in range(_READ_ATTEMPTS):
            current = self.current
            try:
                expert = Expert(current / "model" if current is not None else self.config["base"])
            except (OSError, ValueError):
                if current is not None and self._pointer() != current.name:
                    continue  # a newer add committed and removed it while it was being opened: read again
                raise
            return {n: expert.tensor(n) for n in expert.names()}  # open files: a later removal does not matter
        raise ContinualError(f"continual state '{self.path}' changed {_READ_ATTEMPTS} times while being read; "
                             "read it again")

    def load_into(self, module: torch.nn.Module, prefix: str = "", strict: bool = True) -> None:
        """Load the current merged model into ``module`` (``prefix`` is prepended to names, e.g. ``"model."`` for
        a LightningModule holding the network as ``self.model``)."""
        state = {prefix + k: v for k, v in self.state_dict().items()}
        module.load_state_dict(state, strict=strict)

    # -- adding --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with _flock(self.path):
            yield

    def add(self, expert: Any, *, name: str | None = None, allow_duplicate: bool = False,
            force: bool = False, progress: bool | None = None, threads: int | None = None) -> dict[str, Any]:
        """Fold one expert in (atomically; waits for another process's add to finish first).

        Args:
            expert: a path or :class:`~lightning_merge.Expert` (with statistics for Fisher/OTA).
            name: the journal's name for it (default: the expert's name).
            allow_duplicate: fold in an expert whose weights are already in the journal.
            force: fold in an expert that looks unrelated to the base (a task vector ten times longer than those of the
                experts already merged).
            progress: show progress bars (default: when stderr is a terminal).
            threads: tensors folded at once (default: the CPU count, at most 4); each thread computes with
                ``torch.get_num_threads() // threads`` threads, so an OPCM add's SVDs run side by side.

        Returns:
            The journal entry. When this add retries one that was killed after its commit (the expert is already
            the last one folded in, and that add never finished), nothing is folded in again: the entry is the
            committed one, with ``"completed_interrupted_add": True``, and a warning says so.

        Raises:
            ContinualError: another base, tensor names, shapes or integer tensors than the base's (as the batch
                merge with ``on_missing="error"``), a duplicate, a changed base file, an expert not fine-tuned from
                the base, an expert inside the state's folder, a damaged state.
            StatisticsError: statistics the strategy needs are missing or invalid.
        """
        expert = as_expert(expert)
        if self.url is not None:
            with self._remote_lease(), writing(self.path):
                etag = self._pull()
                return self._add_locked(expert, name, allow_duplicate, force, progress, threads,
                                        publish=lambda: self._push(etag))
        with writing(self.path):  # a full disk or a read-only state: one error naming the state
            return self._add_locked(expert, name, allow_duplicate, force, progress, threads)

    def _add_locked(self, expert: Expert, name: str | None, allow_duplicate: bool, force: bool,
                    progress: bool | None, threads: int | None, publish: Any = None) -> dict[str, Any]:
        with self._locked():
            self._cleanup()
            current, meta = self._snapshot()
            self._check(expert)
            checksum = expert_checksum(expert)
            marker = self._marker()
            last = meta["journal"][-1] if meta["journal"] else None
            if (marker is not None and current is not None and marker["generation"] == current.name
                    and marker["checksum"] == checksum and last is not None and last["checksum"] == checksum):
                # the same add, killed after its commit and before it finished (the cleanup above did the rest)
                (self.path / MARKER).unlink()
                log.warning("continual state '%s': completed an interrupted add of '%s' (committed as expert %d "
                            "before its process stopped); nothing was folded in twice", self.url or self.path,
                            expert.name, last["order"])
                return {**last, "completed_interrupted_add": True}
            if not allow_duplicate:
                for entry in meta["journal"]:
                    if entry["checksum"] == checksum:
                        raise ContinualError(
                            f"expert '{expert.name}' is already merged (entry {entry['order']}, '{entry['name']}'); "
                            "pass allow_duplicate=True (--allow-duplicate) to fold it in again"
                        )
            entry = {
                "order": meta["count"] + 1,
                "name": name or expert.name,
                "path": (expert.name if is_url(expert.name) else str(Path(expert.path).resolve()))
                if expert.path is not None else f"<in memory: {expert.name}>",
                "checksum": checksum,
                "time": _now(),
            }
            self._write_generation(expert, current, meta, entry, force, progress, threads, publish)
        return entry

    def _check(self, expert: Expert) -> None:
        """Refuse, before any work, what the batch merge of the base and this expert would refuse (tensors not in
        both, shapes, floating against integer, integer tensors that differ: ``build_jobs`` with ``on_missing``),
        and what a state cannot fold (another base, missing statistics, an expert inside the state)."""
        if expert.path is not None and self.url is None and _inside(expert.path, self.path):
            raise ContinualError(
                f"expert '{expert.name}' is inside the continual state '{self.path}', whose generations are replaced "
                "at every add; copy it out of the state first"
            )
        base = as_expert(self.config["base"], "base")
        tensors: dict[str, list[int]] = self.config["tensors"]
        floats = [n for n in base.names() if base.spec(n).is_floating]
        changed = [n for n in tensors if n not in floats] + [n for n in floats if n not in tensors]
        if changed:
            raise ContinualError(
                f"the base '{self.config['base']}' changed since the state was created: its floating-point tensors are "
                f"not those state.json records ({', '.join(changed[:3])}); restore the original base file"
            )
        lenient = self.on_missing == "base"
        missing = [n for n in base.names() if n not in expert]
        if missing and not lenient:
            raise ContinualError(
                f"expert '{expert.name}' lacks {len(missing)} tensor(s) of the base ({', '.join(missing[:3])}); "
                "it was not fine-tuned from this state's base (a state created with on_missing='base' counts a "
                "missing tensor as unchanged)"
            )
        extra = [n for n in expert.names() if n not in base]
        if extra and not lenient:
            raise ContinualError(
                f"tensor '{extra[0]}' is in '{expert.name}' but not in the base '{base.name}' ({len(extra)} such "
                "tensor(s)); a continual state merges the base's tensors, as merge(..., on_missing='error'): create "
                "the state with on_missing='base' (--on-missing base) to leave such tensors out"
            )
        lacking = [n for n in missing if n in tensors]
        if lacking and self.strategy.requires:
            raise ContinualError(
                f"expert '{expert.name}' lacks tensor '{lacking[0]}' of the base ({len(lacking)} such), and continual "
                f"{self.strategy.name} weighs every tensor by the expert's statistics, which it cannot have there"
            )
        if lacking and len(lacking) == len(tensors):
            raise ContinualError(f"expert '{expert.name}' has none of the base's floating-point tensors; it was not "
                                 "fine-tuned from this state's base")
        for n in base.names():
            if n not in expert:
                continue
            want, got = base.spec(n), expert.spec(n)
            if list(got.shape) != list(want.shape):
                raise ContinualError(f"expert '{expert.name}': tensor '{n}' has shape {list(got.shape)}, the base "
                                     f"{list(want.shape)}")
            if got.is_floating != want.is_floating:
                raise ContinualError(
                    f"expert '{expert.name}': tensor '{n}' is {'' if got.is_floating else 'not '}floating point and "
                    f"the base's is {'' if want.is_floating else 'not'}; the expert was not fine-tuned from this base"
                )
            if not want.is_floating and not n.endswith("num_batches_tracked") \
                    and not torch.equal(expert.tensor(n), base.tensor(n)):
                raise ContinualError(
                    f"non-floating tensor '{n}' differs between the base '{base.name}' and '{expert.name}'; such "
                    "tensors (indices, position ids) are copied, not merged, so they must be equal, as in "
                    "merge(...): fix the expert"
                )
        fingerprint = _expert_base_fingerprint(expert)
        if fingerprint:
            base_fp = self.config["base_fingerprint"]
            differ = [n for n in base_fp if n in fingerprint and fingerprint[n] != base_fp[n]]
            if differ:
                raise ContinualError(
                    f"expert '{expert.name}' was fine-tuned from another base: its capture's base fingerprint differs "
                    f"on {len(differ)} tensor(s) ({', '.join(differ[:3])})"
                )
        for kind in self.strategy.requires:
            if not expert.has_statistic(kind):
                raise StatisticsError(
                    f"expert '{expert.name}' has no {kind!r} statistics, which continual {self.strategy.name} needs; "
                    "capture them with CurvatureCapture"
                )

    def _write_generation(self, expert: Expert, current: Path | None, meta: dict[str, Any], entry: dict[str, Any],
                          force: bool, progress: bool | None = None, threads: int | None = None,
                          publish: Any = None) -> None:
        from lightning_merge.files.progress import track

        base = as_expert(self.config["base"], "base")
        names = list(self.config["tensors"])
        form = self.form
        count = meta["count"]
        ctx = form.begin(count, expert, names)
        previous = previous_model = None
        if current is not None:
            counters = any(n.endswith("num_batches_tracked") for n in base.names() if n not in names)
            for what, file in (("running quantities", "running.safetensors"), ("model", "model/model.safetensors")):
                if what == "model" and not counters:
                    continue  # the previous model is read only for the counters it carries forward
                try:
                    handle = SafetensorsFile(current / file)
                except (SafetensorsError, OSError) as err:
                    if previous is not None:
                        previous.close()
                    raise ContinualError(
                        f"continual state '{self.path}': the {what} of generation '{current.name}' cannot be read "
                        f"({err}); the state is damaged (restore it from a backup, or start a new state)"
                    ) from None
                if what == "model":
                    previous_model = handle
                else:
                    previous = handle
        tmp = self.path / "generations" / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        writers: list[ShardWriter] = []
        try:
            (tmp / "model").mkdir(parents=True)
            running_entries = [(f"{q}/{n}", TensorSpec(tuple(self.config["tensors"][n]), dtype))
                               for n in names for q, dtype in form.quantities]
            running = ShardWriter(tmp / "running.safetensors", running_entries, {"format": FORMAT})
            writers.append(running)
            model_entries = [(n, TensorSpec(tuple(base.spec(n).shape), base.spec(n).dtype)) for n in base.names()]
            model = ShardWriter(tmp / "model" / "model.safetensors", model_entries, {"format": "pt"})
            writers.append(model)
            fingerprints = self.config["base_fingerprint"]
            totals: dict[str, float] = {}
            tau_sq = 0.0
            sizes = [base.spec(n).nbytes for n in names]
            def fold(n: str) -> tuple[float, dict[str, float]]:
                """Fold tensor ``n`` in and write its new running quantities (tensors are independent: threads)."""
                b_raw = base.tensor(n)
                if tensor_fingerprint(b_raw) != fingerprints[n]:
                    raise ContinualError(
                        f"the base '{self.config['base']}' changed since the state was created (tensor '{n}' differs "
                        "from its fingerprint in state.json); restore the original base file"
                    )
                b = base.float32(n)
                # a tensor the expert lacks (on_missing="base") is unchanged, as the batch merge reads the base's
                tau = expert.float32(n) - b if n in expert else torch.zeros_like(b)
                prev = None
                if previous is not None:
                    try:
                        prev = {q: previous.get(f"{q}/{n}").to(dtype) for q, dtype in form.quantities}
                    except (KeyError, SafetensorsError) as err:
                        raise ContinualError(
                            f"continual state '{self.path}': generation '{current.name}' has no running quantities "
                            f"for '{n}' ({err}); the state is damaged"
                        ) from None
                stats = {kind: expert.statistic(n, kind) for kind in self.strategy.requires}
                new = form.fold(n, prev, tau, stats, ctx)
                for q, dtype in form.quantities:
                    running.write(f"{q}/{n}", new[q].to(dtype).contiguous())
                return float(tau.double().square().sum()), form.reduce(n, new)

            for square, reduced in parallel_map(fold, names, sizes, "folding in", progress, threads):
                tau_sq += square  # summed in tensor order whatever the threads: the same floats every time
                for key, value in reduced.items():
                    totals[key] = totals.get(key, 0.0) + value
            running.close(sync=True)
            norm = math.sqrt(tau_sq)
            self._check_distance(expert, norm, meta["norms"], force)
            summary = ContinualSummary(
                count=count + 1,
                norms=(*meta["norms"], norm),
                weights=(*meta["weights"], ctx.weight),
                totals=totals,
                names=tuple(names),
            )
            with SafetensorsFile(tmp / "running.safetensors") as fresh:
                every = base.names()
                for n in track(every, [base.spec(n).nbytes for n in every], "writing the model", progress):
                    if n not in self.config["tensors"]:  # non-floating tensors: the base's (checked equal) ...
                        value = base.tensor(n)
                        if n.endswith("num_batches_tracked") and n in expert:  # ... or the largest seen, as merge()
                            seen = previous_model.get(n) if previous_model is not None else value
                            value = torch.maximum(seen, expert.tensor(n).to(seen.dtype))
                        model.write(n, value.to(base.spec(n).dtype).contiguous())
                        continue
                    state = {q: fresh.get(f"{q}/{n}") for q, _ in form.quantities}
                    merged = form.finish(n, base.float32(n), state, summary)
                    magnitude = largest_magnitude(merged)  # one reduction: finiteness, then the base dtype's range
                    if not math.isfinite(magnitude):
                        raise ContinualError(f"continual {self.strategy.name} produced non-finite values at '{n}'")
                    model.write(n, cast_checked(merged, base.spec(n).dtype, n, CONTINUAL_DTYPE_HINT,
                                                magnitude=magnitude).contiguous())
            model.close(sync=True)
            base_path = Path(self.config["base"])
            if base_path.is_dir():
                copy_support_files(base_path, tmp / "model")
            new_meta = {
                "count": count + 1,
                "norms": list(summary.norms),
                "weights": list(summary.weights),
                "totals": totals,
                "journal": [*meta["journal"], entry],
                "strategy": self.strategy.to_dict(),
                "library_version": __version__,
            }
            write_json(tmp / "meta.json", new_meta)
            fsync_dir(tmp / "model")
            fsync_dir(tmp)
            # on object storage a generation is uploaded before the commit, so its name must be one no other writer
            # can pick: a losing writer's upload then never touches the committed generation
            unique = f"-{uuid.uuid4().hex[:8]}" if self.url is not None else ""
            final = self.path / "generations" / f"{count + 1:06d}{unique}"
            # named before it appears: a reader then knows it is not committed, and a retry of this add after a
            # kill past the commit completes it instead of calling the expert a duplicate
            with atomic_file(self.path / MARKER) as marker:
                marker.write_text(json.dumps({"generation": final.name, "checksum": entry["checksum"],
                                              "pid": os.getpid()}))
            if final.exists():  # left by a crash after the rename but before the commit: not current, replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            with atomic_file(self.path / POINTER) as pointer:  # the commit point
                pointer.write_text(final.name + "\n")
        except BaseException:
            for writer in writers:
                writer.close(sync=False)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for handle in (previous, previous_model):
                if handle is not None:
                    handle.close()
        self._refresh_link(final)
        if current is not None and current != final:
            self._remove_generation(current)
        if publish is not None:
            publish()
        # the add has finished: the last step (not made durable: if a crash undoes it, ADDING names the current
        # generation again and a retry of this add completes it)
        (self.path / MARKER).unlink(missing_ok=True)

    def _check_distance(self, expert: Expert, norm: float, norms: list[float], force: bool) -> None:
        """An expert ten times farther from the base than those already merged is refused (an unrelated model, or
        one fine-tuned from another base without a capture fingerprint to say so); three times is warned about."""
        if force or not norms:
            return
        typical = _statistics.median(norms)
        if typical <= 0:
            return
        ratio = norm / typical
        if ratio > MAX_RELATIVE_NORM:
            raise ContinualError(
                f"expert '{expert.name}' moved {ratio:.1f}× farther from the base than the experts already merged "
                f"(‖τ‖ = {norm:.4g}, median {typical:.4g}): it does not look fine-tuned from this state's base. Pass "
                "force=True (--force) to fold it in anyway"
            )
        if ratio > MAX_RELATIVE_NORM / 3:
            import logging

            logging.getLogger("lightning_merge").warning(
                "expert '%s' moved %.1f× farther from the base than the experts already merged (‖τ‖ = %.4g, median "
                "%.4g): check that it was fine-tuned from this base", expert.name, ratio, norm, typical)

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

    def tidy(self) -> None:
        """Remove what a crashed add left behind (partial generations, the previous generation of an add killed
        after its commit) and repair the ``current`` link; waits for a concurrent add. ``add`` does this first."""
        with self._locked():
            self._cleanup()

    def _cleanup(self) -> None:
        """Remove what a crashed add left behind (partial generations, generations never committed, old
        generations, stray links) and repair the convenience link; the commit pointer decides what is current
        (never the link, which a copy can break). Only what the state names is removed: folders of ``generations/``
        named as the state names generations, never another file, and never through a symbolic link."""
        _refuse_links(self.path)
        generations = self.path / "generations"
        generations.mkdir(exist_ok=True)
        current = self.current
        for item in generations.iterdir():
            if not (_GENERATION.fullmatch(item.name) or _PARTIAL.fullmatch(item.name)):
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

    # -- object storage ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """For a state on object storage: bring the local mirror up to the committed generation (another process
        may have added experts since this object was made). A no-op for a local state."""
        if self.url is not None:
            self._pull()

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

    def describe(self) -> dict[str, Any]:
        """What ``lightning-merge continual show`` prints: strategy, base, count, journal, norms, model path (all
        from one committed generation, while other processes add)."""
        current, meta = self._snapshot()
        model = None
        if current is not None:
            model = join(self.url, "generations", current.name, "model") if self.url else str(current / "model")
        return {
            "path": self.url or str(self.path),
            "strategy": self.config["strategy"],
            "base": self.config["base"],
            "on_missing": self.on_missing,
            "count": meta["count"],
            "model": model,
            "mean_task_vector_norm": (sum(meta["norms"]) / len(meta["norms"])) if meta["norms"] else None,
            "journal": [{**e, "task_vector_norm": n} for e, n in zip(meta["journal"], meta["norms"])],
        }


def parallel_map(fn: Any, names: list[str], sizes: list[int], desc: str, progress: bool | None,
                 threads: int | None) -> Iterator[Any]:
    """``fn(name)`` for each name on ``threads`` worker threads (each with its share of torch's threads), results
    yielded in the order of ``names``.

    Memory: the tensors being folded (running or queued) never exceed ``threads`` × the largest one in bytes; a
    slot is freed when its tensor finishes, not when its result's turn comes, so a small tensor (a bias) between two
    large ones (weights) never leaves a worker idle. ``fn``'s results are held until their turn (they are small).
    An error in any ``fn`` cancels the queued ones and is raised here."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from lightning_merge.files.progress import Progress

    workers = max(1, min(threads or min(4, os.cpu_count() or 1), len(names) or 1))
    total_threads = torch.get_num_threads()
    bar = Progress(desc, sum(sizes), progress)
    try:
        if workers == 1:
            for name, size in zip(names, sizes):
                yield fn(name)
                bar.update(size)
            return
        share = max(1, total_threads // workers)
        torch.set_num_threads(share)
        limit = workers * max(sizes)
        # OpenMP's thread count is per thread: each worker sets its own share, or it would run torch's default count
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning-merge-fold",
                                  initializer=torch.set_num_threads, initargs=(share,))
        try:
            running: dict[Any, tuple[int, int]] = {}
            results: dict[int, Any] = {}
            in_flight = 0
            turn = 0

            def ready() -> Iterator[Any]:
                """The results whose turn has come, in the order of ``names``."""
                nonlocal turn
                while turn in results:
                    yield results.pop(turn)
                    turn += 1

            def collect(block: bool) -> None:
                nonlocal in_flight
                done, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
                for future in done:
                    index, size = running.pop(future)
                    in_flight -= size
                    results[index] = future.result()
                    bar.update(size)

            for index, (name, size) in enumerate(zip(names, sizes)):
                while running and in_flight + size > limit:
                    collect(block=True)
                running[pool.submit(fn, name)] = (index, size)
                in_flight += size
                collect(block=False)
                yield from ready()
            while running:
                collect(block=True)
                yield from ready()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        torch.set_num_threads(total_threads)
        bar.close()


def _expert_base_fingerprint(expert: Expert) -> dict[str, str]:
    stats = expert.statistics
    if stats is None:
        return {}
    raw = stats.metadata.get("base_fingerprint")
    if not raw:
        return {}
    try:
        fingerprint = json.loads(raw)
    except json.JSONDecodeError:
        raise ContinualError(f"{stats.origin}: metadata base_fingerprint is not valid JSON") from None
    prefix = expert.prefix or ""
    return {k[len(prefix):]: v for k, v in fingerprint.items() if k.startswith(prefix)}


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold the state's exclusive lock (``path/.lock``): adds, and the creation of ``state.json``, take turns."""
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


def _refuse_links(path: Path) -> None:
    """A state's own files and folders must be its own: not symbolic links (an add replaces and deletes inside them,
    and through a link it would touch what the link points to: a shared folder, another state), and not a folder
    where the state keeps a file (or the reverse)."""
    for name in _OWN:
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


def _refuse_foreign(path: Path) -> None:
    """A new state goes into a new or empty folder: the state's cleanup deletes what it names, and a folder holding
    other files (a model, an expert, notes) is not one the state should write into."""
    if not path.is_dir():
        return
    _refuse_links(path)
    foreign = sorted(p.name for p in path.iterdir()
                     if not (p.name == ".lock" or p.name.startswith(".state.json.partial-")
                             or (p.name == "generations" and not any(p.iterdir()))))
    if foreign:
        listing = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise refusal(path, f"holds files and no continual state ({listing}); a continual state needs a new or empty "
                            "folder")


def _state_holding(path: Path) -> Path | None:
    """The continual state folder ``path`` lies in (its ``state.json`` above it), or None."""
    for parent in path.parents:
        config = parent / "state.json"
        if (parent / "generations").is_dir() and config.is_file():
            with contextlib.suppress(OSError, ValueError, RecursionError):
                found = json.loads(config.read_text())
                if isinstance(found, dict) and found.get("format") == FORMAT:
                    return parent
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _validate_config(where: Path, config: Any) -> None:
    """``state.json`` as the state wrote it, or a one-line error naming what is wrong (never a traceback later)."""
    def damaged(what: str) -> ContinualError:
        return ContinualError(f"'{where}': {what}; the state is damaged (restore state.json from a backup)")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ContinualError(f"'{where}' is not a lightning-merge continual state")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise damaged("format_version is not a number")
    if version > FORMAT_VERSION:
        raise ContinualError(f"'{where.parent}' was written by a newer lightning-merge; upgrade")
    for key in ("strategy", "base", "tensors", "base_fingerprint"):
        if key not in config:
            raise damaged(f"it has no {key!r}")
    if not isinstance(config["strategy"], dict):
        raise damaged(f"'strategy' is a {type(config['strategy']).__name__}, not an object")
    if not isinstance(config["base"], str) or not config["base"]:
        raise damaged("'base' is not a path")
    tensors, fingerprints = config["tensors"], config["base_fingerprint"]
    if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            for shape in tensors.values()):
        raise damaged("'tensors' is not an object of tensor names and shapes")
    if not isinstance(fingerprints, dict) or set(fingerprints) != set(tensors) or \
            not all(isinstance(v, str) for v in fingerprints.values()):
        raise damaged("'base_fingerprint' does not give one fingerprint per tensor")
    if config.get("on_missing", "error") not in ON_MISSING:
        raise damaged(f"'on_missing' is {config.get('on_missing')!r}, not one of {', '.join(ON_MISSING)}")


def _parse_meta(where: Path, text: str) -> dict[str, Any]:
    """A generation's ``meta.json``, checked as the state wrote it (count, one norm, weight and journal entry per
    expert), or a one-line error naming the file."""
    def damaged(what: str) -> ContinualError:
        return ContinualError(f"'{where}': {what}; the state is damaged (restore the generation from a backup, or "
                              "start a new state)")

    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise damaged(f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise damaged(f"a {type(meta).__name__}, not an object")
    count = meta.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise damaged(f"count is {count!r}, not a positive number")
    meta.setdefault("weights", [1.0] * count)
    for key in ("norms", "weights"):
        values = meta.get(key)
        if not isinstance(values, list) or len(values) != count or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise damaged(f"{key!r} is not a list of {count} numbers")
    journal = meta.get("journal")
    if not isinstance(journal, list) or len(journal) != count or not all(
            isinstance(e, dict) and isinstance(e.get("order"), int)
            and all(isinstance(e.get(k), str) for k in ("name", "path", "checksum", "time")) for e in journal):
        raise damaged(f"its journal is not a list of {count} entries with order, name, path, checksum and time")
    if not isinstance(meta.setdefault("totals", {}), dict):
        raise damaged("'totals' is not an object")
    return meta


def _mirror(url: str) -> Path:
    """The local mirror of a continual state kept in object storage (under the fetch cache)."""
    return cache_dir() / "continual" / hashlib.sha256(url.encode()).hexdigest()[:24]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["ContinualError", "ContinualState", "expert_checksum"]
