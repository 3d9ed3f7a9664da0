"""Continual merging: a state folder that folds experts in one at a time, crash-safe, in constant memory and time
per added expert whatever the number already merged.

The state is only a transactional store: what is kept per tensor and how an expert is folded in is the strategy's
continual form (:meth:`~lightning_merge.strategies.Strategy.continual_form`), asked for when the state is created.

Layout of a state folder (docs/continual.md)::

    STATE/
      state.json                 configuration: format, version, strategy, base path, base fingerprint, tensors
      CURRENT                    the name of the current generation: the commit point (replaced atomically)
      current -> generations/000003      a convenience link to it (refreshed after each commit)
      generations/000003/
        meta.json                count, per-expert norms and weights, the journal (name, path, checksum, order, time)
        running.safetensors      the running quantities of the strategy's continual form (Σwτ and Σw, OPCM's S...)
        model/model.safetensors  the current merged model (a safetensors folder: load it directly)
      .lock                      held while an expert is added

Adding an expert writes a complete new generation next to the current one, streamed tensor by tensor (read the
running quantities, fold, write; then finish and write the model), then replaces ``CURRENT``: a crash at any point
leaves the previous state whole, and the add can be retried. Two processes adding at once take turns (an exclusive
``fcntl`` lock), so neither expert is lost.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics as _statistics
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge._finite import all_finite
from lightning_merge._text import brief
from lightning_merge._version import __version__
from lightning_merge.experts import Expert, as_expert
from lightning_merge.io import atomic_file, fsync_dir, special_file_kind, writing
from lightning_merge.safetensors_io import SafetensorsError, SafetensorsFile, ShardWriter, TensorSpec
from lightning_merge.stats import StatisticsError, tensor_fingerprint
from lightning_merge.storage import (
    PreconditionFailed,
    cache_dir,
    download_tree,
    filesystem,
    is_url,
    join,
    put_conditional,
    read_versioned,
    remove,
    upload,
)
from lightning_merge.storage import exists as remote_exists
from lightning_merge.strategies.base import ContinualForm, ContinualSummary, NoContinualForm, Strategy
from lightning_merge.writers import copy_support_files, write_json

FORMAT = "lightning-merge/continual"
FORMAT_VERSION = 2
POINTER = "CURRENT"
#: an expert whose task vector is this many times longer than the median expert already merged is refused as not
#: fine-tuned from the base (an unrelated model); a third of that is warned about.
MAX_RELATIVE_NORM = 10.0


class ContinualError(ValueError):
    """An expert that cannot be folded in (another base, other tensors, a duplicate), or a broken state."""


def expert_checksum(expert: Expert) -> str:
    """Identity of an expert's weights: sha256 over names, shapes and sampled fingerprints of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(expert.names()):
        digest.update(name.encode())
        digest.update(tensor_fingerprint(expert.tensor(name)).encode())
    return digest.hexdigest()


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
        config = self.path / "state.json"
        if not config.exists():
            raise FileNotFoundError(f"'{self.path}' is not a continual-merge state (no state.json); create it first")
        if special_file_kind(config) is not None:
            raise ContinualError(f"'{config}' is {special_file_kind(config)}, not a file; the state is damaged")
        try:
            self.config = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ContinualError(f"'{config}' is not valid JSON ({err}); the state is damaged") from None
        if not isinstance(self.config, dict) or self.config.get("format") != FORMAT:
            raise ContinualError(f"'{config}' is not a lightning-merge continual state")
        try:
            version = int(self.config.get("format_version", 0))
        except (TypeError, ValueError):
            raise ContinualError(f"'{config}': format_version is not a number; the state is damaged") from None
        if version > FORMAT_VERSION:
            raise ContinualError(f"'{self.path}' was written by a newer lightning-merge; upgrade")
        for key in ("strategy", "base", "tensors", "base_fingerprint"):
            if key not in self.config:
                raise ContinualError(f"'{config}' has no {key!r}; the state is damaged")
        _check_config(config, self.config)
        try:
            self.strategy = Strategy.from_dict(self.config["strategy"])
            self.form: ContinualForm = self.strategy.continual_form()
        except (ValueError, TypeError) as err:
            raise ContinualError(f"'{config}': its strategy cannot be used: {err}") from None

    # -- creation ------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        base: str | os.PathLike,
        strategy: Strategy | Mapping[str, Any],
        *,
        exist_ok: bool = False,
    ) -> ContinualState:
        """Create a state folder for merging experts of ``base`` with ``strategy``.

        Args:
            path: the folder (created).
            base: the base model every expert was fine-tuned from (a path: the state refers to it and checks, at
                every add, that it has not changed).
            strategy: a strategy with a continual form, or its ``to_dict()``.
            exist_ok: return the existing state if ``path`` already holds one with the same base and strategy.

        Raises:
            ContinualError: the strategy has no continual form (the message says why), or ``path`` holds a state
                with another base or strategy.
        """
        strategy = strategy if isinstance(strategy, Strategy) else Strategy.from_dict(strategy)
        try:
            strategy.continual_form()
        except NoContinualForm as err:
            raise ContinualError(str(err)) from None
        url = str(path).rstrip("/") if is_url(path) else None
        base_ref = str(base) if is_url(base) else str(Path(base).resolve())
        path = Path(path) if url is None else _mirror(url)
        if (url is not None and remote_exists(join(url, "state.json"))) or (url is None and
                                                                          (path / "state.json").exists()):
            if not exist_ok:
                raise FileExistsError(f"continual state '{url or path}' already exists")
            state = cls(url or path)
            if state.strategy.to_dict() != strategy.to_dict() or state.config["base"] != base_ref:
                raise ContinualError(f"continual state '{url or path}' exists with another base or strategy")
            return state
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
        if url is not None:  # created by one conditional write: of two creators, one wins and the other is told
            try:
                put_conditional(join(url, "state.json"), json.dumps(config, indent=2).encode())
            except PreconditionFailed:
                raise FileExistsError(f"continual state '{url}' already exists (created concurrently)") from None
            shutil.rmtree(path, ignore_errors=True)  # a mirror of an earlier state at this URL
            return cls(url)
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
            (path / "generations").mkdir(exist_ok=True)
            with atomic_file(path / "state.json") as tmp:
                tmp.write_text(json.dumps(config, indent=2))
        return cls(path)

    # -- reading -------------------------------------------------------------------------------------------------
    @property
    def current(self) -> Path | None:
        """The current generation folder, or None before the first expert.

        Raises:
            ContinualError: the state names a generation that is gone, or has generations but no commit pointer.
        """
        name = self._pointer()
        if name is None:
            done = [p for p in (self.path / "generations").glob("[0-9]*") if p.is_dir()] \
                if (self.path / "generations").is_dir() else []
            if done:
                raise ContinualError(
                    f"continual state '{self.path}' holds generations ({', '.join(sorted(p.name for p in done))}) but "
                    f"no {POINTER} pointer: it is damaged; write the name of the newest complete generation into "
                    f"'{self.path / POINTER}' to recover it"
                )
            return None
        folder = self.path / "generations" / name
        if not (folder / "meta.json").is_file():
            raise ContinualError(
                f"continual state '{self.path}': its current generation '{name}' is missing or incomplete; the state "
                "is damaged (restore the folder from a backup, or start a new state)"
            )
        return folder

    def _pointer(self) -> str | None:
        pointer = self.path / POINTER
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not name or "/" in name or name.startswith("."):
                raise ContinualError(f"'{pointer}' holds {name!r}, not a generation name; the state is damaged")
            return name
        link = self.path / "current"
        if link.is_symlink():  # a state written before the pointer file existed
            return Path(os.readlink(link)).name
        return None

    @property
    def model_path(self) -> Path | None:
        """The merged model (a safetensors folder), or None before the first expert."""
        current = self.current
        return (current / "model") if current is not None else None

    def meta(self) -> dict[str, Any]:
        current = self.current
        if current is None:
            return {"count": 0, "norms": [], "weights": [], "journal": []}
        try:
            meta = json.loads((current / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ContinualError(f"'{current / 'meta.json'}' is not valid JSON ({err}); the state is damaged") from None
        if isinstance(meta, dict) and "weights" not in meta and isinstance(meta.get("count"), int):
            meta["weights"] = [1.0] * meta["count"]  # written before per-expert weights were recorded
        _check_meta(current / "meta.json", meta)
        return meta

    @property
    def journal(self) -> list[dict[str, Any]]:
        """The experts folded in, in order: name, path, checksum, order, time."""
        return self.meta()["journal"]

    @property
    def count(self) -> int:
        return self.meta()["count"]

    def state_dict(self) -> dict[str, Tensor]:
        """The current merged model as a state dict (base tensors before the first expert)."""
        source = self.model_path if self.model_path is not None else self.config["base"]
        expert = Expert(source)
        return {n: expert.tensor(n) for n in expert.names()}

    def load_into(self, module: torch.nn.Module, prefix: str = "", strict: bool = True) -> None:
        """Load the current merged model into ``module`` (``prefix`` is prepended to names, e.g. ``"model."`` for
        a LightningModule holding the network as ``self.model``)."""
        state = {prefix + k: v for k, v in self.state_dict().items()}
        module.load_state_dict(state, strict=strict)

    # -- adding --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
            The journal entry.

        Raises:
            ContinualError: another base, other tensor names or shapes, a duplicate, a changed base file, an
                expert not fine-tuned from the base.
            StatisticsError: statistics the strategy needs are missing or invalid.
        """
        expert = as_expert(expert)
        if self.url is not None:
            with self._remote_lease(), writing(self.path):
                etag = self._pull()
                entry = self._add_locked(expert, name, allow_duplicate, force, progress, threads)
                self._push(etag)
            return entry
        with writing(self.path):  # a full disk or a read-only state: one error naming the state
            return self._add_locked(expert, name, allow_duplicate, force, progress, threads)

    def _add_locked(self, expert: Expert, name: str | None, allow_duplicate: bool, force: bool,
                    progress: bool | None, threads: int | None) -> dict[str, Any]:
        with self._locked():
            self._cleanup()
            meta = self.meta()
            self._check(expert)
            checksum = expert_checksum(expert)
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
            self._write_generation(expert, meta, entry, force, progress, threads)
        return entry

    def _check(self, expert: Expert) -> None:
        tensors: dict[str, list[int]] = self.config["tensors"]
        missing = [n for n in tensors if n not in expert]
        if missing:
            raise ContinualError(
                f"expert '{expert.name}' lacks {len(missing)} tensor(s) of the base ({', '.join(missing[:3])}); "
                "it was not fine-tuned from this state's base"
            )
        for n, shape in tensors.items():
            got = list(expert.spec(n).shape)
            if got != shape:
                raise ContinualError(f"expert '{expert.name}': tensor '{n}' has shape {got}, the base {shape}")
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

    def _write_generation(self, expert: Expert, meta: dict[str, Any], entry: dict[str, Any], force: bool,
                          progress: bool | None = None, threads: int | None = None) -> None:
        from lightning_merge.progress import track

        base = as_expert(self.config["base"], "base")
        names = list(self.config["tensors"])
        form = self.form
        count = meta["count"]
        ctx = form.begin(count, expert, names)
        current = self.current
        try:
            previous = SafetensorsFile(current / "running.safetensors") if current is not None else None
        except (SafetensorsError, OSError) as err:
            raise ContinualError(
                f"continual state '{self.path}': the running quantities of generation '{current.name}' cannot be read "
                f"({err}); the state is damaged (restore it from a backup, or start a new state)"
            ) from None
        tmp = self.path / "generations" / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (tmp / "model").mkdir(parents=True)
        writers: list[ShardWriter] = []
        try:
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
                tau = expert.float32(n) - b
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
                    if n not in self.config["tensors"]:  # non-floating tensors come from the base
                        model.write(n, base.tensor(n).contiguous())
                        continue
                    state = {q: fresh.get(f"{q}/{n}") for q, _ in form.quantities}
                    merged = form.finish(n, base.float32(n), state, summary)
                    if not all_finite(merged):
                        raise ContinualError(f"continual {self.strategy.name} produced non-finite values at '{n}'")
                    model.write(n, merged.to(base.spec(n).dtype).contiguous())
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
            if previous is not None:
                previous.close()
        self._refresh_link(final)
        if current is not None and current != final:
            shutil.rmtree(current, ignore_errors=True)

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
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # a copy of the state (shutil.copytree) turned the link into a folder
        tmp = self.path / f".current-{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.relpath(final, self.path), tmp)
        os.replace(tmp, link)
        fsync_dir(self.path)

    def tidy(self) -> None:
        """Remove what a crashed add left behind (partial generations, the previous generation of an add killed
        after its commit) and repair the ``current`` link; waits for a concurrent add. ``add`` does this first."""
        with self._locked():
            self._cleanup()

    def _cleanup(self) -> None:
        """Remove what a crashed add left behind (partial generations, stray links, old generations) and repair the
        convenience link; the commit pointer decides what is current (never the link, which a copy can break)."""
        generations = self.path / "generations"
        generations.mkdir(exist_ok=True)
        current = self.current
        for item in generations.iterdir():
            if item.name.startswith(".partial-") or (current is not None and item.name != current.name):
                shutil.rmtree(item, ignore_errors=True)
        for item in self.path.glob(".current-*"):
            item.unlink(missing_ok=True)
        for item in self.path.glob(f".{POINTER}.partial-*"):
            item.unlink(missing_ok=True)
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
        """What ``lightning-merge continual show`` prints: strategy, base, count, journal, norms, model path."""
        meta = self.meta()
        return {
            "path": self.url or str(self.path),
            "strategy": self.config["strategy"],
            "base": self.config["base"],
            "count": meta["count"],
            "model": (join(self.url, "generations", self.model_path.parent.name, "model") if self.url else
                      str(self.model_path)) if self.model_path else None,
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

    from lightning_merge.progress import Progress

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


def _damaged(path: Path, what: str) -> ContinualError:
    return ContinualError(f"'{path}': {what}; the state is damaged (restore it from a backup, or start a new state)")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_config(path: Path, config: Mapping[str, Any]) -> None:
    """``state.json`` as the state writes it: a strategy object, a base path, tensor shapes and their fingerprints."""
    if not isinstance(config["strategy"], Mapping) or not isinstance(config["strategy"].get("name"), str):
        raise _damaged(path, "'strategy' is not an object with a 'name'")
    if not isinstance(config["base"], str) or not config["base"]:
        raise _damaged(path, "'base' is not a path")
    tensors, fingerprints = config["tensors"], config["base_fingerprint"]
    if not isinstance(tensors, Mapping):
        raise _damaged(path, "'tensors' is not an object of tensor names to shapes")
    for name, shape in tensors.items():
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _damaged(path, f"the shape of tensor {name!r} is {brief(shape)}, not a list of sizes")
    if not isinstance(fingerprints, Mapping) or set(fingerprints) != set(tensors) or \
            not all(isinstance(v, str) for v in fingerprints.values()):
        raise _damaged(path, "'base_fingerprint' does not hold one fingerprint per tensor")


def _check_meta(path: Path, meta: Any) -> None:
    """A generation's ``meta.json`` as the state writes it: ``count`` experts, and as many norms, weights and journal
    entries (objects with a name and a checksum)."""
    if not isinstance(meta, dict):
        raise _damaged(path, f"it holds a {type(meta).__name__}, not an object")
    count = meta.get("count")
    if not _is_count(count):
        raise _damaged(path, f"'count' is {brief(count)}, not a number of experts")
    for key in ("norms", "weights", "journal"):
        value = meta.get(key)
        if not isinstance(value, list) or len(value) != count:
            raise _damaged(path, f"'{key}' is {brief(value)}, not a list of {count} entries (one per expert)")
    for key in ("norms", "weights"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in meta[key]):
            raise _damaged(path, f"'{key}' holds {brief(meta[key])}, not finite numbers")
    for i, entry in enumerate(meta["journal"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "checksum")):
            raise _damaged(path, f"journal entry {i} is {brief(entry)}, not an object with a name and a checksum")
    if not isinstance(meta.get("totals", {}), dict):
        raise _damaged(path, "'totals' is not an object")


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


def _mirror(url: str) -> Path:
    """The local mirror of a continual state kept in object storage (under the fetch cache)."""
    return cache_dir() / "continual" / hashlib.sha256(url.encode()).hexdigest()[:24]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["ContinualError", "ContinualState", "expert_checksum"]
