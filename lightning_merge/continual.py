"""Continual merging: a state folder that folds experts in one at a time, crash-safe, in constant memory and time
per added expert whatever the number already merged.

Layout of a state folder (docs/continual.md)::

    STATE/
      state.json                 configuration: format, version, strategy, base path, base fingerprint, tensors
      current -> generations/000003      (a symbolic link, replaced atomically)
      generations/000003/
        meta.json                count, per-expert norms, the journal (identity, path, checksum, order, time)
        running.safetensors      the running quantities (Σwτ and Σw, or OPCM's S)
        model/model.safetensors  the current merged model (a safetensors folder: load it directly)
      .lock                      held while an expert is added

Adding an expert writes a complete new generation next to the current one, then swaps ``current``: a crash at
any point leaves the previous state whole, and the add can be retried. Two processes adding at once take turns
(an exclusive ``fcntl`` lock), so neither expert is lost.
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
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.experts import Expert, as_expert
from lightning_merge.io import fsync_dir
from lightning_merge.stats import StatisticsError, tensor_fingerprint
from lightning_merge.strategies.base import Strategy
from lightning_merge.strategies.continual import DEFAULT_NOT_LINEAR, opcm_step
from lightning_merge.strategies.functional import fisher_precision, ota_precision

FORMAT = "lightning-merge/continual"
FORMAT_VERSION = 1
CONTINUAL = ("linear", "task_arithmetic", "fisher", "ota", "opcm")


class ContinualError(ValueError):
    """An expert that cannot be folded in (another base, other tensors, a duplicate), or a broken state."""


def expert_checksum(expert: Expert) -> str:
    """Identity of an expert's weights: sha256 over names, shapes and sampled fingerprints of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(expert.names()):
        digest.update(name.encode())
        digest.update(tensor_fingerprint(expert.tensor(name)).encode())
    return digest.hexdigest()


def _weight_fn(strategy: Strategy):
    """Per-tensor weights w (a tensor or a float) of one expert for the precision-weighted forms."""
    name = strategy.name
    if name == "fisher":
        kind = strategy.requires[0]

        def fisher_w(stats: Mapping[str, Tensor], scale: float) -> Tensor:
            return fisher_precision(stats[kind], strategy.floor, strategy.eps).mul_(scale)

        return fisher_w
    if name == "ota":
        if strategy.grafting:
            raise ContinualError("continual OTA does not support Fast Fisher Grafting (density/threshold)")

        def ota_w(stats: Mapping[str, Tensor], scale: float) -> Tensor:
            return ota_precision(stats["exp_avg_sq"], strategy.power, strategy.eps, strategy.mean_normalize).mul_(scale)

        return ota_w
    return None


class ContinualState:
    """A continual-merge state folder. Create it once, then :meth:`add` experts as they finish.

    Example::

        state = ContinualState.create("merged-state", base="base/", strategy=OPCM(alpha=0.5))
        state.add("runs/task1/final.safetensors")
        state.add("runs/task2/final.safetensors")
        state.model_path                          # STATE/current/model: a safetensors folder
        state.journal                             # what was folded in, in order

    Strategies: :class:`~lightning_merge.Linear` (running average), :class:`~lightning_merge.TaskArithmetic`,
    :class:`~lightning_merge.Fisher`, :class:`~lightning_merge.OTA` (without grafting) and
    :class:`~lightning_merge.strategies.OPCM`. Folding experts in one at a time gives the same model as merging them
    all at once with the same strategy.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config = self.path / "state.json"
        if not config.exists():
            raise FileNotFoundError(f"'{self.path}' is not a continual-merge state (no state.json); create it first")
        self.config = json.loads(config.read_text())
        if self.config.get("format") != FORMAT:
            raise ContinualError(f"'{config}' is not a lightning-merge continual state")
        if int(self.config.get("format_version", 0)) > FORMAT_VERSION:
            raise ContinualError(f"'{self.path}' was written by a newer lightning-merge; upgrade")
        self.strategy = Strategy.from_dict(self.config["strategy"])

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
            base: the base model every expert was fine-tuned from (a path: the state refers to it).
            strategy: one of the continual strategies (see the class docstring), or its ``to_dict()``.
            exist_ok: return the existing state if ``path`` already holds one with the same base and strategy.
        """
        strategy = strategy if isinstance(strategy, Strategy) else Strategy.from_dict(strategy)
        if strategy.name not in CONTINUAL:
            raise ContinualError(f"strategy {strategy.name!r} has no continual form; use one of {', '.join(CONTINUAL)}")
        if getattr(strategy, "weighting", None) is not None:
            raise ContinualError(
                f"TaskArithmetic(weighting={strategy.weighting!r}) has no continual form here; use the strategy "
                f"{'fisher' if strategy.weighting == 'fisher' else 'ota'!r} itself, whose continual form is exact"
            )
        _weight_fn(strategy)  # validates (OTA grafting)
        path = Path(path)
        if (path / "state.json").exists():
            if not exist_ok:
                raise FileExistsError(f"continual state '{path}' already exists")
            state = cls(path)
            if state.strategy.to_dict() != strategy.to_dict() or state.config["base"] != str(Path(base).resolve()):
                raise ContinualError(f"continual state '{path}' exists with another base or strategy")
            return state
        base_expert = as_expert(str(base), "base")
        names = [n for n in base_expert.names() if base_expert.spec(n).is_floating]
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "strategy": strategy.to_dict(),
            "base": str(Path(base).resolve()),
            "created": _now(),
            "tensors": {n: list(base_expert.spec(n).shape) for n in names},
            "base_fingerprint": {n: tensor_fingerprint(base_expert.tensor(n)) for n in names},
        }
        path.mkdir(parents=True, exist_ok=True)
        from lightning_merge.io import atomic_file

        with atomic_file(path / "state.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        (path / "generations").mkdir(exist_ok=True)
        return cls(path)

    # -- reading -------------------------------------------------------------------------------------------------
    @property
    def current(self) -> Path | None:
        """The current generation folder, or None before the first expert."""
        link = self.path / "current"
        return link.resolve() if link.exists() else None

    @property
    def model_path(self) -> Path | None:
        """The merged model (a safetensors folder), or None before the first expert."""
        return (self.path / "current" / "model") if self.current else None

    def meta(self) -> dict[str, Any]:
        current = self.current
        if current is None:
            return {"count": 0, "norms": [], "journal": []}
        return json.loads((current / "meta.json").read_text())

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

    def add(self, expert: Any, *, name: str | None = None, allow_duplicate: bool = False) -> dict[str, Any]:
        """Fold one expert in (atomically; waits for another process's add to finish first).

        Args:
            expert: a path or :class:`~lightning_merge.Expert` (with statistics for Fisher/OTA).
            name: the journal's name for it (default: the expert's name).
            allow_duplicate: fold in an expert whose weights are already in the journal.

        Returns:
            The journal entry.

        Raises:
            ContinualError: another base, other tensor names or shapes, a duplicate, missing statistics.
        """
        expert = as_expert(expert)
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
                "path": str(Path(expert.path).resolve()) if expert.path is not None else None,
                "checksum": checksum,
                "time": _now(),
            }
            self._write_generation(expert, meta, entry)
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

    def _write_generation(self, expert: Expert, meta: dict[str, Any], entry: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        from lightning_merge.writers import copy_support_files

        base = as_expert(self.config["base"], "base")
        names = list(self.config["tensors"])
        strategy = self.strategy
        current = self.current
        previous: Mapping[str, Tensor] = {}
        if current is not None:
            from safetensors import safe_open

            handle = safe_open(str(current / "running.safetensors"), framework="pt")
            previous = {k: handle.get_tensor(k) for k in handle.keys()}
        weight_fn = _weight_fn(strategy)
        expert_scale = 1.0
        if strategy.name == "fisher" and strategy.normalize:
            kind = strategy.requires[0]
            norm = math.sqrt(sum(float(expert.statistic(n, kind).double().square().sum()) for n in names))
            expert_scale = 1.0 / max(norm, torch.finfo(torch.float32).tiny)
        weights = getattr(strategy, "weights", None)
        if isinstance(weights, (list, tuple)):
            raise ContinualError("continual strategies take one weight for every expert (weights=None or a number)")
        lam = float(weights) if weights is not None else 1.0

        running: dict[str, Tensor] = {}
        tau_sq = 0.0
        for n in names:
            b = base.tensor(n).to(torch.float32)
            t = expert.tensor(n).to(torch.float32)
            tau = t - b
            tau_sq += float(tau.double().square().sum())
            if strategy.name == "opcm":
                running[f"S/{n}"] = opcm_step(n, previous.get(f"S/{n}"), tau, strategy.alpha, strategy.not_linear)
            elif strategy.name in ("linear", "task_arithmetic"):
                prev = previous.get(f"sum/{n}")
                running[f"sum/{n}"] = tau * lam if prev is None else prev + tau * lam
            else:
                w = weight_fn({k: expert.statistic(n, k) for k in strategy.requires}, expert_scale * lam)
                num, den = previous.get(f"num/{n}"), previous.get(f"den/{n}")
                running[f"num/{n}"] = w * tau if num is None else num + w * tau
                running[f"den/{n}"] = w.clone() if den is None else den + w
        norms = [*meta["norms"], math.sqrt(tau_sq)]
        count = meta["count"] + 1
        total_weight = meta.get("total_weight", 0.0) + lam

        merged = self._merged(base, names, running, norms, total_weight)
        tmp = self.path / "generations" / f".partial-{uuid.uuid4().hex[:8]}"
        (tmp / "model").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in running.items()}, str(tmp / "running.safetensors"))
        dtypes = {n: base.spec(n).dtype for n in names}
        model = {n: merged[n].to(dtypes[n]).contiguous() for n in names}
        for n in base.names():  # non-floating tensors come from the base
            if n not in model:
                model[n] = base.tensor(n).contiguous()
        save_file(model, str(tmp / "model" / "model.safetensors"), metadata={"format": "pt"})
        base_path = Path(self.config["base"])
        if base_path.is_dir():
            copy_support_files(base_path, tmp / "model")
        new_meta = {
            "count": count,
            "norms": norms,
            "total_weight": total_weight,
            "journal": [*meta["journal"], entry],
            "strategy": strategy.to_dict(),
        }
        (tmp / "meta.json").write_text(json.dumps(new_meta, indent=2))
        for file in (tmp / "running.safetensors", tmp / "meta.json", tmp / "model" / "model.safetensors"):
            _fsync(file)
        fsync_dir(tmp / "model")
        fsync_dir(tmp)
        final = self.path / "generations" / f"{count:06d}"
        if final.exists():  # left by a crash after the rename but before the swap: not current, replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        link_tmp = self.path / f".current-{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.relpath(final, self.path), link_tmp)
        os.replace(link_tmp, self.path / "current")  # the commit point
        fsync_dir(self.path)
        if current is not None and current != final:
            shutil.rmtree(current, ignore_errors=True)

    def _merged(
        self, base: Expert, names: list[str], running: Mapping[str, Tensor], norms: list[float], total_weight: float
    ) -> dict[str, Tensor]:
        strategy = self.strategy
        out: dict[str, Tensor] = {}
        if strategy.name == "opcm":
            s_norm = math.sqrt(sum(float(running[f"S/{n}"].double().square().sum()) for n in names))
            factor = (sum(norms) / len(norms)) / s_norm if s_norm > 0 else 0.0
            for n in names:
                out[n] = base.tensor(n).to(torch.float32) + factor * running[f"S/{n}"]
            return out
        for n in names:
            b = base.tensor(n).to(torch.float32)
            if strategy.name == "linear":
                tau = running[f"sum/{n}"] / total_weight
            elif strategy.name == "task_arithmetic":
                tau = running[f"sum/{n}"] * strategy.scale
            else:
                den = running[f"den/{n}"]
                tau = torch.where(den > 0, running[f"num/{n}"] / den.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
                tau = tau * strategy.scale
            out[n] = b + tau
        return out

    def _cleanup(self) -> None:
        """Remove what a crashed add left behind (partial generations, stray links, old generations)."""
        generations = self.path / "generations"
        current = self.current
        for item in generations.iterdir():
            if item.name.startswith(".partial-") or (current is not None and item.resolve() != current):
                shutil.rmtree(item, ignore_errors=True)
        for item in self.path.glob(".current-*"):
            item.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """What ``lightning-merge continual show`` prints: strategy, base, count, journal, norms, model path."""
        meta = self.meta()
        return {
            "path": str(self.path),
            "strategy": self.config["strategy"],
            "base": self.config["base"],
            "count": meta["count"],
            "model": str(self.model_path) if self.model_path else None,
            "mean_task_vector_norm": (sum(meta["norms"]) / len(meta["norms"])) if meta["norms"] else None,
            "journal": [{**e, "task_vector_norm": n} for e, n in zip(meta["journal"], meta["norms"])],
        }


def _expert_base_fingerprint(expert: Expert) -> dict[str, str]:
    stats = expert.statistics
    if stats is None:
        return {}
    raw = stats.metadata.get("base_fingerprint")
    if not raw:
        return {}
    fingerprint = json.loads(raw)
    prefix = expert.prefix or ""
    return {k[len(prefix) :]: v for k, v in fingerprint.items() if k.startswith(prefix)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["CONTINUAL", "ContinualError", "ContinualState", "DEFAULT_NOT_LINEAR", "expert_checksum"]
