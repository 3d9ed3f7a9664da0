"""Continual merging: a state folder that folds experts in one at a time, crash-safe, in constant memory and time
per added expert whatever the number already merged.

The state is only a transactional store: what is kept per tensor and how an expert is folded in is the strategy's
continual form (:meth:`~lightning_merge.strategies.Strategy.continual_form`), asked for when the state is created.
:class:`ContinualState` is the public API; the work is done by the modules beside this one:

- :mod:`~lightning_merge.continual.layout`: the on-disk format (file names, ``state.json`` and ``meta.json``);
- :mod:`~lightning_merge.continual.store`: the folder (its layout is described there), reading the last committed
  generation, the commit, the lock, the cleanup after a crash;
- :mod:`~lightning_merge.continual.checks`: the checks of an expert against the state;
- :mod:`~lightning_merge.continual.fold`: folding an expert in (a new generation, tensor by tensor, on a bounded
  pool of threads);
- :mod:`~lightning_merge.continual.remote`: a state on object storage (a mirror, a lease, a compare-and-swap).

Adding an expert writes a complete new generation next to the current one, streamed tensor by tensor (read the
running quantities, fold, write; then finish and write the model), then replaces ``CURRENT``: a crash at any point
leaves the previous state whole, and the add can be retried (a retry of an add killed after its commit completes it).
Two processes adding at once take turns (an exclusive ``fcntl`` lock), so neither expert is lost; readers never take
the lock and always see the last committed generation. The state deletes only what it wrote: generations it named,
never through a symbolic link (a state whose own files or folders are links is refused).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge._version import __version__
from lightning_merge.continual.checks import MAX_RELATIVE_NORM as MAX_RELATIVE_NORM
from lightning_merge.continual.checks import check_expert, expert_checksum
from lightning_merge.continual.fold import CONTINUAL_DTYPE_HINT as CONTINUAL_DTYPE_HINT
from lightning_merge.continual.fold import build_generation
from lightning_merge.continual.fold import parallel_map as parallel_map
from lightning_merge.continual.layout import FORMAT, FORMAT_VERSION, MARKER, ON_MISSING, now
from lightning_merge.continual.layout import POINTER as POINTER
from lightning_merge.continual.remote import RemoteStore, mirror
from lightning_merge.continual.store import READ_ATTEMPTS, flock, refuse_foreign, refuse_occupied, state_holding
from lightning_merge.engine.options import parse_size
from lightning_merge.errors import ContinualError
from lightning_merge.files.atomic import atomic_file, writing
from lightning_merge.files.remote import PreconditionFailed, is_url, join, put_conditional, redact
from lightning_merge.files.remote import exists as remote_exists
from lightning_merge.sources.expert import Expert, as_expert
from lightning_merge.strategies.base import NoContinualForm, Strategy

log = logging.getLogger("lightning_merge")


class ContinualState(RemoteStore):
    """A continual-merge state folder. Create it once, then :meth:`add` experts as they finish.

    Example::

        state = ContinualState.create("merged-state", base="base/", strategy=OPCM(alpha=0.5))
        state.add("runs/task1/final.safetensors")
        state.add("runs/task2/final.safetensors")
        state.model_path                          # STATE/current/model: a safetensors folder
        state.journal                             # what was folded in, in order

    Any strategy with a continual form works (``Strategy.continual_form()``): Linear, TaskArithmetic, DARE and
    Breadcrumbs without election, CABS, Fisher, OTA (with Fast Fisher Grafting), OPCM, DOP, LiNeS with a fixed α over
    any of them. Folding experts in one at a time gives the same model as merging them all at once with the same
    strategy; strategies whose merge needs every expert at once (TIES' election, the weighted median, consensus)
    are refused when the state is created.

    Args:
        path: the state's folder, or its address on object storage (``s3://...``: the state is then mirrored in
            the fetch cache and committed there by a compare-and-swap).

    Raises:
        FileNotFoundError: ``path`` holds no state (create it first).
        ContinualError: its ``state.json`` is damaged, or the state's own files are links.
    """

    def __init__(self, path: str | os.PathLike):
        self.url: str | None = str(path).rstrip("/") if is_url(path) else None
        if self.url is not None:  # object storage: a local mirror of the state, synchronised by the commit protocol
            self.path = mirror(self.url)
            self._pull()
        else:
            self.path = Path(path)
        self._open()

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
        path = Path(path) if url is None else mirror(url)
        holder = None if is_url(base) else state_holding(Path(base_ref))
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
            refuse_occupied(url, path)
        else:
            if path.exists() and not path.is_dir():
                raise ContinualError(f"'{path}' is a file; a continual state is a folder: choose another path")
            if (path / "state.json").exists():
                return existing()
            refuse_foreign(path)
        base_expert = as_expert(str(base), "base")
        names = [n for n in base_expert.names() if base_expert.spec(n).is_floating]
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "strategy": strategy.to_dict(),
            "base": base_ref,
            "created": now(),
            "tensors": {n: list(base_expert.spec(n).shape) for n in names},
            "base_fingerprint": {n: base_expert.fingerprint(n) for n in names},
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
            with flock(path):  # two creators: one writes state.json, the other finds it (exist_ok) or is told
                if (path / "state.json").exists():
                    created = None
                else:
                    refuse_foreign(path)
                    (path / "generations").mkdir(exist_ok=True)
                    with atomic_file(path / "state.json") as tmp:
                        tmp.write_text(json.dumps(config, indent=2))
                    created = cls(path)
        return created if created is not None else existing()

    # -- reading -------------------------------------------------------------------------------------------------
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
        """The number of experts folded in (0 before the first)."""
        return self.meta()["count"]

    def state_dict(self) -> dict[str, Tensor]:
        """The current merged model as a state dict (base tensors before the first expert)."""
        expert = self.current_expert()
        return {n: expert.tensor(n) for n in expert.names()}

    def current_expert(self) -> Expert:
        """The current merged model (the base before the first expert) as a lazy :class:`~lightning_merge.Expert`:
        its files are open, so a later add that removes this generation does not disturb the reads."""
        for _ in range(READ_ATTEMPTS):
            current = self.current
            try:
                return Expert(current / "model" if current is not None else self.config["base"])
            except (OSError, ValueError):
                if current is not None and self._pointer() != current.name:
                    continue  # a newer add committed and removed it while it was being opened: read again
                raise
        raise ContinualError(f"continual state '{self.path}' changed {READ_ATTEMPTS} times while being read; "
                             "read it again")

    def load_into(self, module: torch.nn.Module, prefix: str = "", strict: bool = True) -> None:
        """Load the current merged model into ``module`` (``prefix`` is prepended to names, e.g. ``"model."`` for
        a LightningModule holding the network as ``self.model``)."""
        state = {prefix + k: v for k, v in self.state_dict().items()}
        module.load_state_dict(state, strict=strict)

    # -- adding --------------------------------------------------------------------------------------------------
    def add(self, expert: Any, *, name: str | None = None, allow_duplicate: bool = False,
            force: bool = False, progress: bool | None = None, threads: int | None = None,
            memory_budget: int | str | None = None) -> dict[str, Any]:
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
            memory_budget: the bytes the tensors folded at once may hold (``"1GB"`` or bytes; default 192 MiB), each
                counted as its continual form's working set (see :mod:`lightning_merge.engine.schedule`); a tensor
                costing more than the budget is folded alone.

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
        budget = None if memory_budget is None else parse_size(memory_budget, "memory_budget")
        if self.url is not None:
            with self._remote_lease(), writing(self.path):
                etag = self._pull()
                return self._add_locked(expert, name, allow_duplicate, force, progress, threads,
                                        publish=lambda: self._push(etag), memory_budget=budget)
        with writing(self.path):  # a full disk or a read-only state: one error naming the state
            return self._add_locked(expert, name, allow_duplicate, force, progress, threads, memory_budget=budget)

    def _add_locked(self, expert: Expert, name: str | None, allow_duplicate: bool, force: bool,
                    progress: bool | None, threads: int | None, publish: Any = None,
                    memory_budget: int | None = None) -> dict[str, Any]:
        with self._locked():
            self._cleanup()
            current, meta = self._snapshot()
            check_expert(self, expert)
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
                "time": now(),
            }
            self._write_generation(expert, current, meta, entry, force, progress, threads, publish, memory_budget)
        return entry

    def _write_generation(self, expert: Expert, current: Path | None, meta: dict[str, Any], entry: dict[str, Any],
                          force: bool, progress: bool | None = None, threads: int | None = None,
                          publish: Any = None, memory_budget: int | None = None) -> None:
        """Fold ``expert`` into a new generation (:func:`~lightning_merge.continual.fold.build_generation`), commit
        it, then remove ``current``, ``publish`` it (object storage) and finish the add."""
        tmp = self._partial()
        build_generation(self, tmp, expert, current, meta, entry, force, progress, threads, memory_budget)
        try:
            final = self._commit(tmp, meta["count"] + 1, entry["checksum"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._finish(final, current, publish)

    def tidy(self) -> None:
        """Remove what a crashed add left behind (partial generations, the previous generation of an add killed
        after its commit) and repair the ``current`` link; waits for a concurrent add. ``add`` does this first."""
        with self._locked():
            self._cleanup()

    # -- object storage ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """For a state on object storage: bring the local mirror up to the committed generation (another process
        may have added experts since this object was made). A no-op for a local state."""
        if self.url is not None:
            self._pull()

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


__all__ = ["ContinualError", "ContinualState", "expert_checksum"]
