"""Checkpoint averaging within a run: choose checkpoints, weigh them (uniform, metrics-weighted, curvature), stream
the average from disk, and write a checkpoint that loads and resumes like any Lightning checkpoint.

Used by :class:`lightning_merge.callbacks.CheckpointAveraging` and ``lightning-merge average``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_merge.files.remote import basename, is_url, local_path, redact
from lightning_merge.formats.sidecar import tensor_fingerprint

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "mwa", "fisher", "ota")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a Lightning checkpoint says about itself (read without its tensors' data).

    Attributes:
        path: the file.
        global_step: the Trainer's step when it was saved.
        epoch: the epoch.
        score: the monitored metric ModelCheckpoint recorded for it (``current_score``), or None.
        monitor: the metric's name, or None.
        made_by_lightning_merge: the checkpoint is an output of this project (an average or a merge).
        digest: identity of its weights (names and sampled values of every tensor), to find copies.
    """

    path: Path
    global_step: int
    epoch: int
    score: float | None
    monitor: str | None
    made_by_lightning_merge: bool = False
    digest: str = ""


def read_info(path: str | os.PathLike, trust_checkpoint: bool = False) -> CheckpointInfo:
    """Step, epoch and monitored score of a checkpoint (memory-mapped: tensors are not read)."""
    ckpt = _load_checkpoint(path, trust_checkpoint)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    score, monitor = None, None
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping):
            current = state.get("current_score")
            if current is not None:
                score = float(current)
                monitor = state.get("monitor")
                break
    digest = hashlib.sha256()
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else {}
    for name in sorted(state):
        value = state[name]
        if isinstance(value, _Lazy):
            value = value.read()
        if isinstance(value, Tensor):
            digest.update(name.encode())
            digest.update(tensor_fingerprint(value).encode())
    where = path if is_url(path) else Path(path)
    return CheckpointInfo(where, int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), score, monitor,
                          made_by_lightning_merge="lightning_merge" in ckpt, digest=digest.hexdigest())


class _Lazy:
    """A tensor of a distributed checkpoint, read when asked for."""

    def __init__(self, expert: Any, name: str):
        self.expert, self.name = expert, name

    def read(self) -> Tensor:
        return self.expert.tensor(self.name)


def _load_checkpoint(path: str | os.PathLike, trust_checkpoint: bool) -> Any:
    """A checkpoint's entries: a ``.ckpt`` file memory-mapped; a distributed checkpoint (a folder) as its ``meta.pt``
    with a ``state_dict`` of its weights, each read when asked for (:class:`_Lazy`)."""
    from lightning_merge.files.torch_load import load_torch_file
    from lightning_merge.sources.distcp import DistributedCheckpoint, is_distributed_checkpoint
    from lightning_merge.sources.expert import Expert

    local = Path(local_path(path))
    if not is_distributed_checkpoint(local):
        return load_torch_file(local, trust_checkpoint)
    expert = Expert(local)
    meta = DistributedCheckpoint(local).lightning_meta(trust_checkpoint)
    return {**meta, "state_dict": {name: _Lazy(expert, name) for name in expert.names()}}


def distinct_checkpoints(infos: Sequence[CheckpointInfo]) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """The checkpoints worth averaging: without links or copies of one another (``last.ckpt`` is a copy of the
    newest) and without this project's own outputs (an earlier ``averaged.ckpt``, a merge). Returns
    ``(kept, [(skipped path, why)])``; of identical checkpoints the one with the plainest name is kept."""
    kept: list[CheckpointInfo] = []
    skipped: list[tuple[Path, str]] = []
    by_digest: dict[str, CheckpointInfo] = {}
    by_target: dict[Path, CheckpointInfo] = {}
    # ModelCheckpoint's own names (epoch=..-step=..) before last.ckpt and other copies
    def is_link(path: Any) -> bool:
        return not is_url(path) and path.is_symlink()

    for info in sorted(infos, key=lambda i: (is_link(i.path), basename(i.path).startswith("last"), str(i.path))):
        target = info.path if is_url(info.path) else info.path.resolve()
        if info.made_by_lightning_merge:
            skipped.append((info.path, "an output of lightning-merge (an average or a merge), not a checkpoint of the "
                                       "run"))
        elif target in by_target:
            skipped.append((info.path, f"the same file as '{by_target[target].path}'"))
        elif info.digest and info.digest in by_digest:
            skipped.append((info.path, f"a copy of '{by_digest[info.digest].path}' (same weights)"))
        else:
            kept.append(info)
            by_target[target] = info
            if info.digest:
                by_digest[info.digest] = info
    order = {id(i): n for n, i in enumerate(infos)}
    return sorted(kept, key=lambda i: order[id(i)]), skipped


def mwa_weights(values: Sequence[float], p: float, mode: str, names: Sequence[str] | None = None) -> list[float]:
    """Metrics-weighted averaging: wᵢ ∝ mᵢ⁻ᵖ for a metric to minimise, mᵢᵖ to maximise (or a step count);
    normalised to sum 1; p = 0 is uniform.

    Raises:
        ValueError: a metric ≤ 0 or not finite (naming the checkpoint), or an unknown mode.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    for i, m in enumerate(values):
        if m is None or not math.isfinite(m) or m <= 0:
            who = names[i] if names else f"#{i}"
            raise ValueError(
                f"checkpoint '{who}' has metric {m!r}: metrics-weighted averaging needs positive finite metrics; "
                "weigh by step instead (mwa_by='step' / --mwa-by step)"
            )
    raw = [m ** (-p) if mode == "min" else m**p for m in values]
    total = sum(raw)
    return [r / total for r in raw]


def select_checkpoints(
    infos: Sequence[CheckpointInfo],
    *,
    select: str = "all",
    k: int | None = None,
    window: tuple[int, int] | None = None,
    window_unit: str = "step",
    mode: str = "min",
) -> list[CheckpointInfo]:
    """Choose checkpoints: ``"top_k"`` by score, ``"last"`` k by step, ``"window"`` [start, end] in steps or epochs,
    or ``"all"``; returned oldest first."""
    ordered = sorted(infos, key=lambda i: (i.global_step, str(i.path)))
    if select == "all":
        chosen = ordered
    elif select == "last":
        chosen = ordered[-(k or len(ordered)) :]
    elif select == "top_k":
        scored = [i for i in ordered if i.score is not None]
        if len(scored) < len(ordered):
            missing = [str(i.path) for i in ordered if i.score is None]
            raise ValueError(f"select='top_k' needs a monitored score in every checkpoint; missing in {missing[:3]}")
        ranked = sorted(scored, key=lambda i: i.score, reverse=(mode == "max"))
        keep = {i.path for i in ranked[: (k or len(ranked))]}
        chosen = [i for i in ordered if i.path in keep]
    elif select == "window":
        if window is None:
            raise ValueError("select='window' needs window=(start, end)")
        lo, hi = window
        key = (lambda i: i.global_step) if window_unit == "step" else (lambda i: i.epoch)
        chosen = [i for i in ordered if lo <= key(i) <= hi]
    else:
        raise ValueError(f"select must be one of all, top_k, last, window; got {select!r}")
    if not chosen:
        raise ValueError(f"no checkpoint matches select={select!r} (k={k}, window={window}) among {len(infos)}")
    return chosen


def checkpoint_weights(
    infos: Sequence[CheckpointInfo], weighting: str, *, mwa_by: str = "metric", p: float = 1.0, mode: str = "min"
) -> list[float] | None:
    """Per-checkpoint weights for ``uniform`` / ``mwa`` (None for the curvature weightings, which weigh per entry)."""
    if weighting == "uniform":
        return [1.0 / len(infos)] * len(infos)
    if weighting == "mwa":
        names = [str(i.path) for i in infos]
        if mwa_by == "step":
            return mwa_weights([float(i.global_step) for i in infos], p, "max", names)
        if mwa_by != "metric":
            raise ValueError(f"mwa_by must be 'metric' or 'step', got {mwa_by!r}")
        return mwa_weights([i.score for i in infos], p, mode, names)
    if weighting in ("fisher", "ota"):
        return None
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def average_checkpoints(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    weighting: str = "uniform",
    weights: Sequence[float] | None = None,
    mwa_by: str = "metric",
    p: float = 1.0,
    mode: str = "min",
    source: str = "state_dict",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_training_state: bool = True,
    on_missing_statistic: str = "error",
    trust_checkpoint: bool = False,
    overwrite: bool = False,
) -> tuple[dict[str, Tensor], list[float] | None]:
    """Average Lightning checkpoints, streaming tensor by tensor.

    Args:
        paths: the checkpoints (oldest first is conventional; the newest is the template of the output).
        out: where to write the averaged checkpoint (None: only return the state dict).
        weighting: ``"uniform"``, ``"mwa"`` (metrics-weighted), ``"fisher"`` or ``"ota"`` (per-entry curvature
            weights from each checkpoint's sidecar).
        weights: explicit per-checkpoint weights (overrides ``weighting`` for the linear forms).
        mwa_by: MWA from the monitored ``"metric"`` or the ``"step"``.
        p: MWA's penalty exponent.
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy) for the metric.
        source: ``"state_dict"`` (the model weights; under Lightning's WeightAveraging/EMA callbacks these are the
            averaged weights) or ``"current_model_state"`` (the raw weights such checkpoints also keep).
        include / exclude: glob patterns of tensors to average; others come from the newest checkpoint.
        keep_training_state: keep the newest checkpoint's optimizer, scheduler and loop state in the output so it
            resumes like any checkpoint (the average then continues with the newest checkpoint's Adam moments);
            False writes a weights-only checkpoint.
        on_missing_statistic: for the curvature weightings.
        trust_checkpoint: allow unpickling checkpoints that hold custom objects.
        overwrite: replace ``out`` if it is an earlier output of lightning-merge (anything else is refused).

    Returns:
        ``(averaged state dict, weights or None)``.
    """
    from lightning_merge.engine.run import merge
    from lightning_merge.formats.sidecar import find_sidecar
    from lightning_merge.sources.expert import Expert
    from lightning_merge.strategies.checks import check_number, normalizing_sum
    from lightning_merge.strategies.curvature import OTA, Fisher
    from lightning_merge.strategies.linear import Linear

    if not paths:
        raise ValueError("no checkpoints to average")
    if out is not None:  # checked before anything is read: an output that is one of the inputs is refused
        _check_output(out, paths, overwrite)
    if source not in ("state_dict", "current_model_state"):
        raise ValueError(f"source must be 'state_dict' or 'current_model_state', got {source!r}")
    infos = [read_info(path, trust_checkpoint) for path in paths]
    if weights is not None:
        if len(weights) != len(paths):
            raise ValueError(f"{len(weights)} weights for {len(paths)} checkpoints")
        check_number("average_checkpoints", "weights", list(weights), per_expert=True)  # finite numbers
        total = normalizing_sum("average_checkpoints", [float(w) for w in weights])  # refuses a sum of 0
        ws: list[float] | None = [float(w) / total for w in weights]
    else:
        ws = checkpoint_weights(infos, weighting, mwa_by=mwa_by, p=p, mode=mode)
    experts = []
    for path in paths:
        if source == "state_dict":
            experts.append(Expert(path, trust_checkpoint=trust_checkpoint))
        else:
            ckpt = _load_checkpoint(path, trust_checkpoint)
            if "current_model_state" not in ckpt:
                raise ValueError(
                    f"checkpoint '{path}' has no 'current_model_state' (it was not saved with WeightAveraging)"
                )
            sidecar = find_sidecar(path)
            experts.append(
                Expert(
                    dict(ckpt["current_model_state"]),
                    name=str(path),
                    statistics=str(sidecar) if sidecar is not None else None,
                )
            )
    if ws is not None:
        strategy: Any = Linear(weights=ws)
    elif weighting == "fisher":
        strategy = Fisher(normalize=False)
    else:
        strategy = OTA()
    state = merge(
        experts, strategy=strategy, include=include, exclude=exclude, on_missing_statistic=on_missing_statistic
    )
    log.info(
        "averaged %d checkpoints (%s): %s",
        len(paths),
        weighting,
        ", ".join(f"{redact(basename(i.path))}={w:.3f}" for i, w in zip(infos, ws or [float("nan")] * len(infos))),
    )
    if out is not None:
        write_averaged_checkpoint(
            state,
            paths,
            out,
            weighting=weighting,
            weights=ws,
            keep_training_state=keep_training_state,
            trust_checkpoint=trust_checkpoint,
            overwrite=overwrite,
        )
    return state, ws


def write_averaged_checkpoint(
    state: Mapping[str, Tensor],
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weighting: str,
    weights: Sequence[float] | None,
    keep_training_state: bool = True,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
) -> Path:
    """The newest checkpoint with its ``state_dict`` replaced by the average, written atomically (a local path or an
    object-storage URL). When the newest is a distributed checkpoint (a folder), the output is a weights-only
    ``.ckpt`` with its epoch, step, callbacks and hyper-parameters: its optimizer state is sharded, and a resume
    without it would fail."""
    from lightning_merge.files.checkpoint import TRAINING_STATE, write_checkpoint

    _check_output(out, paths, overwrite)
    out = out if is_url(out) else Path(out)
    newest = max(paths, key=lambda p: read_info(p, trust_checkpoint).global_step)
    template = dict(_load_checkpoint(newest, trust_checkpoint))
    template.pop("state_dict", None)  # replaced by the average (a distributed checkpoint's holds lazy readers)
    if keep_training_state and not is_url(newest) and Path(newest).is_dir():
        log.warning("'%s' is a distributed checkpoint: the average is written without its sharded optimizer state, "
                    "loops and schedulers (a weights-only checkpoint)", redact(newest))
        keep_training_state = False
    drop = (*(() if keep_training_state else TRAINING_STATE), "current_model_state", "averaging_state")
    record = {
        "averaged": [redact(p) for p in paths],
        "weighting": weighting,
        "weights": list(weights) if weights is not None else None,
        "template": redact(newest),
    }
    state_dict = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    write_checkpoint(out, state_dict, record, template=template, drop=drop, replace="own" if overwrite else "never")
    return out  # type: ignore[return-value]


def _check_output(out: str | os.PathLike, paths: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """The output rule (see :mod:`lightning_merge.files.outputs`): an existing output must be an earlier one of
    lightning-merge and needs ``overwrite``; an output that is one of the inputs (or their sidecars) is refused."""
    from lightning_merge.files.outputs import check_output
    from lightning_merge.formats.sidecar import sidecar_path

    inputs = [q for p in paths for q in ((p, sidecar_path(p)) if is_url(p) else (Path(p), sidecar_path(Path(p))))]
    check_output(out, overwrite, inputs=inputs, folder=False)


__all__ = [
    "CheckpointInfo",
    "average_checkpoints",
    "distinct_checkpoints",
    "checkpoint_weights",
    "mwa_weights",
    "read_info",
    "select_checkpoints",
    "write_averaged_checkpoint",
]
